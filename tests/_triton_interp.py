"""Make Triton's CPU interpreter round fp32 -> bf16 the way the GPU does.

Triton 3.8's interpreter (TRITON_INTERPRET=1) converts fp32 to bf16 by dropping the low 16 bits
(round toward zero): ``InterpreterBuilder.cast_impl`` calls ``_convert_float`` with no rounding
mode.  Compiled kernels round to nearest even (``cvt.rn.bf16.f32``), as torch does.  Truncation
doubles the error of every bf16 rounding in the kernels (P before P @ V, dS before dS @ K, the
output store), so interpreted bf16 runs were about twice as far from the oracle as the GPU's and
randomised cases crossed the DESIGN.md bound for a reason that does not exist on hardware.
"""
from __future__ import annotations

import numpy as np


def _rne_bf16(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16), round to nearest even; NaN stays a (quiet) NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def truncates() -> bool:
    """Whether the interpreter's fp32 -> bf16 cast truncates (1 + 2^-8 + 2^-9 must round up)."""
    import triton.language as tl
    from triton.runtime import interpreter

    x = np.array([1.0 + 2.0**-8 + 2.0**-9], dtype=np.float32)
    out = interpreter.interpreter_builder.cast_impl(interpreter.TensorHandle(x, tl.float32), tl.bfloat16)
    return int(np.asarray(out.data).view(np.uint16)[0]) != int(_rne_bf16(x)[0])


def round_bf16_to_nearest() -> bool:
    """Patch the interpreter's fp32 -> bf16 cast to round to nearest even (once; no-op when it
    already does, or when Triton has no interpreter).  Returns whether the cast rounds now."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:  # noqa: BLE001 - no Triton: nothing to patch
        return False
    if not truncates():
        return True
    cls = interpreter.InterpreterBuilder
    cast = cls.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_rne_bf16(src.data).reshape(np.shape(src.data)), dst_type.scalar)
        return cast(self, src, dst_type)

    cls.cast_impl = cast_impl
    # create_fp_trunc and friends are lambdas that look cast_impl up at call time
    return not truncates()


# -- speed: patch triton.language once per launch, not once per helper call --------------------
#
# Triton 3.8's interpreter swaps triton.language's builtins for interpreted ones when a launch
# starts (GridExecutor.__call__ -> _patch_lang, undone when the launch ends), and again at every
# call of a @triton.jit helper (InterpretedFunction.__call__ -> _patch_lang, never undone).  Inside
# a launch that second patch finds every builtin of a module it saw before already replaced and
# sets the same attributes to equivalent lambdas; its cost is five inspect.getmembers scans of
# triton.language, about a quarter of an interpreted kernel's run time with helpers called per
# tile.  The wrapper below skips it when the helper sees no language module that was not patched
# already in the running launch (by the launch, or by an earlier helper call: Triton's own helpers
# such as tl.max see triton.language.core, the kernels see triton.language).

_PATCHED: list = []          # a stack: the language modules each running launch patched
_LANGS: dict = {}            # function -> the language modules its globals hold (as _patch_lang finds them)


def _lang_modules(fn):
    langs = _LANGS.get(fn)
    if langs is None:
        import inspect

        import triton.language as tl

        langs = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
        _LANGS[fn] = langs
    return langs


def patch_language_once() -> bool:
    """Install the skip described above (once).  Returns whether it is installed."""
    try:
        from triton.runtime import interpreter
    except Exception:  # noqa: BLE001 - no Triton: nothing to patch
        return False
    real = interpreter._patch_lang
    if getattr(real, "_fused_attn_once", False):
        return True

    class _Nothing:
        def restore(self):
            pass

    def patch_lang(fn):
        langs = _lang_modules(fn)
        if _PATCHED and langs <= _PATCHED[-1]:
            return _Nothing()                     # a helper inside a launch: already patched
        scope = real(fn)
        if _PATCHED:              # a helper seeing another module (Triton's own tl.core helpers):
            _PATCHED[-1] |= langs  # patched as before, and so until the launch ends
            return scope
        _PATCHED.append(langs)                    # a launch: patched until its restore()
        restore = scope.restore

        def restore_and_pop():
            _PATCHED.pop()
            restore()

        scope.restore = restore_and_pop
        return scope

    patch_lang._fused_attn_once = True
    interpreter._patch_lang = patch_lang
    return True


# -- speed: no overflow check whose result nobody reads ----------------------------------------
#
# Every integer add / sub / mul of the interpreted kernels runs TritonSemantic's overflow
# sanitizer: both operands cast to int64, the operation again, two comparisons, an and, then
# device_assert -- which returns at once because the interpreter's options have debug=False
# (InterpreterOptions() is never given debug=True).  The check is computed and thrown away, about
# a third of an interpreted kernel's run time.  Skipping it while debug is off changes nothing
# the kernels compute or report; with debug on it runs as before.

def skip_unread_overflow_checks() -> bool:
    """Install the skip described above on the interpreter's semantic object (once)."""
    try:
        from triton.runtime import interpreter
    except Exception:  # noqa: BLE001 - no Triton: nothing to patch
        return False
    sem = interpreter.interpreter_semantic
    real = sem.binary_op_sanitize_overflow_impl
    if getattr(real, "_fused_attn_skip", False):
        return True

    def sanitize(lhs, rhs, binary_op):
        if not sem.builder.options.debug:     # device_assert would discard the result
            return None
        return real(lhs, rhs, binary_op)

    sanitize._fused_attn_skip = True
    sem.binary_op_sanitize_overflow_impl = sanitize
    return True


# -- speed: two per-operation costs of the interpreter, same results -----------------------------
#
# interpreter._get_np_dtype builds a 19-entry dict on every call (once per operation that makes
# a tensor); TritonSemantic.broadcast_impl_value turns both block shapes into triton.language
# tuples (a tuple_type built per element) even when they are equal and nothing is broadcast.
# The replacements keep the dict across calls and return equal-shape blocks at once -- what the
# originals return in that case -- and call the originals for everything else.

def cheaper_operations() -> bool:
    """Install both replacements (once)."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:  # noqa: BLE001 - no Triton: nothing to patch
        return False
    if getattr(interpreter._get_np_dtype, "_fused_attn_fast", False):
        return True
    real_np_dtype = interpreter._get_np_dtype
    table = {}

    def get_np_dtype(tt_dtype):
        if isinstance(tt_dtype, tl.pointer_type):
            return np.dtype(np.uint64)
        elem = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        if isinstance(elem, tl.pointer_type):
            return np.dtype(np.uint64)
        found = table.get(elem)
        if found is None:
            found = table[elem] = real_np_dtype(elem)
        return found

    sem = interpreter.interpreter_semantic
    real_broadcast = sem.broadcast_impl_value

    def broadcast_impl_value(lhs, rhs):
        lt, rt = lhs.type, rhs.type
        if lt.is_block() and rt.is_block() and lt.shape == rt.shape:
            return lhs, rhs
        return real_broadcast(lhs, rhs)

    get_np_dtype._fused_attn_fast = True
    interpreter._get_np_dtype = get_np_dtype
    sem.broadcast_impl_value = broadcast_impl_value
    return True


# -- speed: the shape tuples of block types and tensors ------------------------------------------
#
# Every tensor the interpreter makes builds a block_type and two triton.language tuples of its
# shape, and each tuple builds a tuple_type with one constexpr_type per dimension (a quarter of
# the kernels' run time).  The replacements remember, per shape of plain ints, the tuple_type,
# numel and name that the originals compute, and build the same objects from them; any other
# shape (constexprs, an invalid one that raises) goes through the originals.

def cached_shape_types() -> bool:
    """Install both replacements (once)."""
    try:
        import triton.language as tl
    except Exception:  # noqa: BLE001 - no Triton: nothing to patch
        return False
    core = tl.core
    if getattr(core.block_type.__init__, "_fused_attn_fast", False):
        return True
    real_block_init = core.block_type.__init__
    blocks = {}          # (element type name, dims) -> (shape tuple_type, numel, name)

    def block_init(self, element_ty, shape):
        dims = shape.values if type(shape) is core.tuple else shape
        if type(dims) in (list, builtins_tuple) and all(type(d) is int for d in dims):
            key = (element_ty.name, *dims)      # the name is what the cached fields depend on
            hit = blocks.get(key)
            if hit is not None:
                self.element_ty = element_ty
                self.shape = core.tuple(list(dims), hit[0])
                self.numel, self.name = hit[1], hit[2]
                return
            real_block_init(self, element_ty, shape)
            blocks[key] = (self.shape.type, self.numel, self.name)
            return
        real_block_init(self, element_ty, shape)

    shapes = {}          # dims -> (their constexprs, the tuple_type of those, numel as a constexpr)

    def tensor_init(self, handle, type):
        self.handle = handle
        dims = builtins_tuple(type.shape.values) if type.is_block() else ()
        hit = shapes.get(dims)
        if hit is None:          # constexprs are immutable values: one set per shape serves all tensors
            consts = [core.constexpr(d) for d in dims]
            hit = shapes[dims] = (consts, core.tuple(consts).type, core.constexpr(math.prod(dims)))
        self.numel = hit[2]
        self.type = type
        self.dtype = type.scalar
        self.shape = core.tuple(list(hit[0]), hit[1])

    import builtins
    import math
    builtins_tuple = builtins.tuple
    block_init._fused_attn_fast = True
    core.block_type.__init__ = block_init
    core.tensor.__init__ = tensor_init
    return True


# -- speed: bf16 -> fp32 by a shift ------------------------------------------------------------
#
# The interpreter widens bf16 to fp32 (every bf16 tile that mma() multiplies in fp32, see
# triton_common.py) with _convert_float, a generic field-by-field conversion written in numpy:
# about 1 ms a tile.  bf16 is the top half of an fp32, so the exact widening is a 16-bit shift.
# Over all 65,536 bf16 bit patterns the two agree except on the 254 non-zero subnormals, which
# _convert_float gets wrong (it drops their leading bit's position) and the shift -- like the
# GPU's conversion -- gets right.

def exact_bf16_to_fp32() -> bool:
    """Install the shift in the interpreter's cast (once)."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:  # noqa: BLE001 - no Triton: nothing to patch
        return False
    cls = interpreter.InterpreterBuilder
    if getattr(cls.cast_impl, "_fused_attn_shift", False):
        return True
    cast = cls.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.bfloat16 and dst_type.scalar == tl.float32:
            wide = np.asarray(src.data).astype(np.uint32) << np.uint32(16)
            return interpreter.TensorHandle(wide.view(np.float32), dst_type.scalar)
        return cast(self, src, dst_type)

    cast_impl._fused_attn_shift = True
    cls.cast_impl = cast_impl
    return True


def speed_up() -> bool:
    """All of the above: the interpreter computes the same values (bf16 subnormals: the GPU's),
    about 3x faster on the kernels."""
    return (patch_language_once() & skip_unread_overflow_checks() & cheaper_operations()
            & cached_shape_types() & exact_bf16_to_fp32())
