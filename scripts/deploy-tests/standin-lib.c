/* A stand-in CUDA library (libcublas.so.13, libcudart.so.13, ..., libcuda.so.1) for the deploy kit's
 * tests: one function, no libc. Built once per soname by scripts/test-deploy.sh. */
int ablate_standin_lib(void) { return 0; }
