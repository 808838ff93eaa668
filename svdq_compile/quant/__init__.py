"""svdq_compile/quant"""
