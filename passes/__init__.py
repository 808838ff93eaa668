"""FX graph passes, one transformation per file, run by :mod:`.pipeline`."""
from svdq_compile.passes.find_linears import LinearSite, find_linear_sites
from svdq_compile.passes.plan import SiteGroup, plan_sites
from svdq_compile.passes.quantize_linears import RewriteResult, rewrite_linears

__all__ = ["LinearSite", "find_linear_sites", "SiteGroup", "plan_sites", "RewriteResult", "rewrite_linears"]
