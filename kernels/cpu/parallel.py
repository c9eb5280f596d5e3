"""Dynamic scheduling of a kernel's work items over numba's threads (numba intrinsics).

Numba's ``prange`` splits its range into one contiguous share per thread before the loop
starts (the OpenMP layer's static schedule).  On a machine whose cores do not run at the
same speed (a VM whose virtual CPUs are shared with other guests, where one of two can
run at half speed for seconds), the fast thread then waits for the slow one: the
descriptor kernels' 2-thread time moved by 1.6x from one second to the next while one
thread's stayed within a few %.  The kernels instead run one worker per thread
(``prange(min(n, num_threads()))``), and each worker claims the next work item from a shared
counter (``claim``) until none is left: a slow core simply ends up doing fewer items.
A worker also keeps its scratch arrays over all the items it does.

Both are intrinsics rather than ``numba.get_num_threads()`` / a lock, because a call to
``get_num_threads`` in jitted code makes the function uncacheable (numba treats the
backend's function pointer as a dynamic global), while the symbol the parfor lowering
itself calls is resolved by name when the cached code is loaded.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.ufunc.parallel import _launch_threads


@intrinsic
def num_threads(typingctx):
    """numba's current number of threads (``numba.get_num_threads()``), as an intp."""
    sig = types.intp()

    def codegen(context, builder, signature, args):
        # the threading layer registers the symbol when it starts (a cached parallel kernel
        # starts it before it is linked: the parfor reload hook)
        _launch_threads()
        intp = context.get_value_type(types.intp)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(intp, []),
                                            "get_num_threads")
        return builder.call(fn, [])

    return sig, codegen


@intrinsic
def claim(typingctx, counter):
    """Atomically counter[0] += 1; returns the old value (the caller's work item).

    counter: a C-contiguous int64 array shared by the workers."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64
            and counter.layout == "C"):
        return None
    sig = types.int64(counter)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        one = ir.Constant(ir.IntType(64), 1)
        # monotonic: the items' data are the kernel's inputs and disjoint outputs; only the
        # counter itself is shared, and the parallel region's end orders everything else
        return builder.atomic_rmw("add", ary.data, one, "monotonic")

    return sig, codegen
