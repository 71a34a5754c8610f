"""Triton kernels, each beside the plain torch reference that the CPU path runs and the tests compare with."""
try:
    import triton
except ImportError:  # CPU installs without Triton run the references only
    triton = None


def jit(fn=None, **kwargs):
    """triton.jit, bare or with arguments (`@jit(do_not_specialize=[...])`); without Triton, the function
    itself, which nothing launches."""
    if triton is not None:
        return triton.jit(fn, **kwargs) if fn is not None else triton.jit(**kwargs)
    return fn if fn is not None else (lambda f: f)
