"""svdq_compile/capture"""
