"""Native CPU code: the BLAS MLX's CPU backend binds to, and the small-M matmul kernel."""
