"""svdq_compile/integrations"""
