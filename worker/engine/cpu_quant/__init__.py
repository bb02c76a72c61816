"""Weight-only 4-bit (and 8-bit) linear layers for decoding on the CPU, with AVX2 kernels."""
