"""svdq_compile/integrations/diffusers"""
