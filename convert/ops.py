r"""The tensor ops a conversion rule may name, and the Rule record itself.

A rule table (convert/rules/<family>.py) is data:

    Rule(r"transformer\.h\.(\d+)\.attn\.c_attn\.weight", ("llm.layers.{1}.q.weight", ...), chain(split([H, H, H]), transpose()))

Every op works on numpy arrays of raw storage words (bfloat16 travels as uint16 words), so nothing is ever rounded.
An op has two faces:
  * ``shapes(shape)`` -> the output shapes, computed at plan time from the checkpoint header, before any data is read
    (this is what ``--dry-run`` prints and what the strict shape check compares with the Paddle model);
  * ``apply(array, dtype)`` -> ``[(array, dtype), ...]``, the outputs, as numpy *views* where possible (transpose, split,
    reshape of contiguous data copy nothing; the writer materialises views block by block).
Multi-output ops (split, regroup) give one output per target; in ``chain`` an op after a multi-output op applies to
every output.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence, Union

import numpy as np

__all__ = ["Rule", "Op", "OpError", "keep", "transpose", "split", "regroup", "reshape", "chain", "drop", "cast",
           "FLOAT_DTYPES", "STORAGE", "storage_dtype"]

# logical dtype name -> numpy dtype of the raw words we carry (numpy has no bfloat16)
STORAGE = {
    "bfloat16": np.dtype("uint16"), "float16": np.dtype("float16"), "float32": np.dtype("float32"),
    "float64": np.dtype("float64"), "int64": np.dtype("int64"), "int32": np.dtype("int32"),
    "int16": np.dtype("int16"), "int8": np.dtype("int8"), "uint8": np.dtype("uint8"), "bool": np.dtype("bool"),
}
FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")


def storage_dtype(dtype: str) -> np.dtype:
    try:
        return STORAGE[dtype]
    except KeyError:
        raise OpError(f"unsupported dtype {dtype!r} (supported: {', '.join(STORAGE)})") from None


class OpError(ValueError):
    """An op cannot apply to a tensor (wrong rank, sizes that do not add up...)."""


Shape = tuple


class Op:
    """Base class. Subclasses implement shapes/apply/describe; n_out is None when it equals the input count."""

    def shapes(self, shape: Shape) -> list:
        raise NotImplementedError

    def apply(self, arr: np.ndarray, dtype: str) -> list:
        raise NotImplementedError

    def out_dtypes(self, dtype: str) -> list:
        """Logical dtypes of the outputs (only cast changes it)."""
        return [dtype] * self.count(None)

    def count(self, shape) -> int:
        return 1

    def describe(self) -> str:
        return type(self).__name__.lower()

    def __repr__(self):
        return self.describe()


class _Keep(Op):
    def shapes(self, shape):
        return [tuple(shape)]

    def apply(self, arr, dtype):
        return [(arr, dtype)]

    def describe(self):
        return "keep"


class _Transpose(Op):
    def shapes(self, shape):
        if len(shape) != 2:
            raise OpError(f"transpose needs a 2-D tensor, got shape {list(shape)}")
        return [(shape[1], shape[0])]

    def apply(self, arr, dtype):
        return [(arr.T, dtype)]

    def describe(self):
        return "transpose"


def _axis(axis, ndim, what):
    a = axis + ndim if axis < 0 else axis
    if not 0 <= a < ndim:
        raise OpError(f"{what}: axis {axis} out of range for a {ndim}-D tensor")
    return a


def _resolve_sizes(sizes, total, what):
    sizes = [int(s) for s in sizes]
    if sizes.count(-1) > 1 or any(s < -1 for s in sizes):
        raise OpError(f"{what}: bad sizes {sizes} (non-negative, at most one -1)")
    if -1 in sizes:
        rest = total - sum(s for s in sizes if s != -1)
        if rest < 0:
            raise OpError(f"{what}: sizes {sizes} exceed {total}")
        sizes[sizes.index(-1)] = rest
    if sum(sizes) != total:
        raise OpError(f"{what}: sizes {sizes} sum to {sum(sizes)}, the axis has {total}")
    return sizes


class _Split(Op):
    def __init__(self, sizes, axis=0):
        if not sizes:
            raise OpError("split needs at least one size")
        self.sizes, self.axis = list(sizes), axis

    def _sizes(self, shape):
        a = _axis(self.axis, len(shape), "split")
        return a, _resolve_sizes(self.sizes, shape[a], f"split along axis {self.axis} of shape {list(shape)}")

    def count(self, shape):
        return len(self.sizes)

    def out_dtypes(self, dtype):
        return [dtype] * len(self.sizes)

    def shapes(self, shape):
        a, sizes = self._sizes(shape)
        return [tuple(shape[:a]) + (s,) + tuple(shape[a + 1:]) for s in sizes]

    def apply(self, arr, dtype):
        a, sizes = self._sizes(arr.shape)
        out, off = [], 0
        for s in sizes:
            idx = [slice(None)] * arr.ndim
            idx[a] = slice(off, off + s)
            out.append((arr[tuple(idx)], dtype))
            off += s
        return out

    def describe(self):
        return f"split({self.sizes}, axis={self.axis})"


class _Regroup(Op):
    def __init__(self, groups, sizes, axis=0):
        if groups < 1 or not sizes:
            raise OpError("regroup needs groups >= 1 and at least one size")
        self.groups, self.sizes, self.axis = int(groups), [int(s) for s in sizes], axis

    def _check(self, shape):
        a = _axis(self.axis, len(shape), "regroup")
        block = sum(self.sizes)
        if shape[a] != self.groups * block:
            raise OpError(f"regroup({self.groups} groups x {self.sizes}) along axis {self.axis} needs "
                          f"{self.groups * block}, shape {list(shape)} has {shape[a]}")
        return a

    def count(self, shape):
        return len(self.sizes)

    def out_dtypes(self, dtype):
        return [dtype] * len(self.sizes)

    def shapes(self, shape):
        a = self._check(shape)
        return [tuple(shape[:a]) + (self.groups * s,) + tuple(shape[a + 1:]) for s in self.sizes]

    def apply(self, arr, dtype):
        a = self._check(arr.shape)
        g = arr.reshape(arr.shape[:a] + (self.groups, sum(self.sizes)) + arr.shape[a + 1:])
        out, off = [], 0
        for s in self.sizes:
            idx = [slice(None)] * g.ndim
            idx[a + 1] = slice(off, off + s)
            piece = g[tuple(idx)]
            out.append((piece.reshape(arr.shape[:a] + (self.groups * s,) + arr.shape[a + 1:]), dtype))
            off += s
        return out

    def describe(self):
        return f"regroup({self.groups}, {self.sizes}, axis={self.axis})"


class _Reshape(Op):
    def __init__(self, shape):
        self.shape = [int(s) for s in shape]

    def shapes(self, shape):
        n = int(np.prod(shape, dtype=np.int64))
        new = list(self.shape)
        if new.count(-1) > 1:
            raise OpError(f"reshape{self.shape}: at most one -1")
        if -1 in new:
            rest = int(np.prod([s for s in new if s != -1], dtype=np.int64))
            if rest == 0 or n % rest:
                raise OpError(f"cannot reshape {list(shape)} to {self.shape}")
            new[new.index(-1)] = n // rest
        if int(np.prod(new, dtype=np.int64)) != n:
            raise OpError(f"cannot reshape {list(shape)} ({n} elements) to {self.shape}")
        return [tuple(new)]

    def apply(self, arr, dtype):
        return [(arr.reshape(self.shapes(arr.shape)[0]), dtype)]

    def describe(self):
        return f"reshape({self.shape})"


class _Cast(Op):
    def __init__(self, dtype):
        storage_dtype(dtype)
        self.dtype = dtype

    def shapes(self, shape):
        return [tuple(shape)]

    def out_dtypes(self, dtype):
        return [self.dtype]

    def apply(self, arr, dtype):
        from .writers import cast_words   # the one place that knows how to convert raw words
        return [(cast_words(arr, dtype, self.dtype), self.dtype)]

    def describe(self):
        return f"cast({self.dtype})"


class _Chain(Op):
    def __init__(self, ops):
        for o in ops:
            if not isinstance(o, Op):
                raise OpError(f"chain() takes ops, got {o!r}")
        self.ops = list(ops)

    def count(self, shape):
        n = 1
        for o in self.ops:
            n *= o.count(shape)
        return n

    def shapes(self, shape):
        cur = [tuple(shape)]
        for o in self.ops:
            cur = [s for c in cur for s in o.shapes(c)]
        return cur

    def out_dtypes(self, dtype):
        cur = [dtype]
        for o in self.ops:
            cur = [d for c in cur for d in o.out_dtypes(c)]
        return cur

    def apply(self, arr, dtype):
        cur = [(arr, dtype)]
        for o in self.ops:
            cur = [r for a, d in cur for r in o.apply(a, d)]
        return cur

    def describe(self):
        return " -> ".join(o.describe() for o in self.ops) or "keep"


class _Drop(Op):
    def __init__(self, reason):
        if not reason or not str(reason).strip():
            raise OpError("drop() needs a reason (it is shown in --dry-run)")
        self.reason = str(reason)

    def count(self, shape):
        return 0

    def out_dtypes(self, dtype):
        return []

    def shapes(self, shape):
        return []

    def apply(self, arr, dtype):
        return []

    def describe(self):
        return f"drop ({self.reason})"


def keep() -> Op:
    """Identity."""
    return _Keep()


def transpose() -> Op:
    """2-D [out, in] -> [in, out] (torch nn.Linear weight -> paddle nn.Linear weight)."""
    return _Transpose()


def split(sizes: Sequence[int], axis: int = 0) -> Op:
    """Consecutive pieces along ``axis``, one target each (one size may be -1: the rest)."""
    return _Split(sizes, axis)


def regroup(groups: int, sizes: Sequence[int], axis: int = 0) -> Op:
    """``axis`` = ``groups`` blocks, each block = pieces of ``sizes``; output i = concat over blocks of piece i."""
    return _Regroup(groups, sizes, axis)


def reshape(shape: Sequence[int]) -> Op:
    """Same elements, new shape (one entry may be -1)."""
    return _Reshape(shape)


def chain(*ops: Op) -> Op:
    """Ops in order; an op after a multi-output op applies to every output."""
    return _Chain(ops)


def drop(reason: str) -> Op:
    """The source key is consumed and not written; ``reason`` is shown in --dry-run."""
    return _Drop(reason)


def cast(dtype: str) -> Op:
    """Store this tensor as ``dtype`` (e.g. "float32"); ``--dtype`` other than keep still applies afterwards."""
    return _Cast(dtype)


_GROUP = re.compile(r"\{(\w+)\}")


class Rule:
    """``Rule(pattern, targets, op=keep())``: ``pattern`` full-matches a source key; ``targets`` is one name template or
    a tuple of them (one per op output; empty for drop); ``{1}``/``{name}`` in a template are the regex groups."""

    __slots__ = ("pattern", "regex", "targets", "op")

    def __init__(self, pattern: str, targets: Union[str, Sequence[str], None] = None, op: Optional[Op] = None):
        self.pattern = pattern
        try:
            self.regex = re.compile(pattern)
        except re.error as e:
            raise OpError(f"rule {pattern!r}: bad regex: {e}") from None
        if targets is None or targets == "":
            targets = ()
        elif isinstance(targets, str):
            targets = (targets,)
        self.targets = tuple(targets)
        self.op = op if op is not None else keep()
        if not isinstance(self.op, Op):
            raise OpError(f"rule {pattern!r}: op must come from convert.ops, got {self.op!r}")
        if isinstance(self.op, _Drop) and self.targets:
            raise OpError(f"rule {pattern!r}: a drop rule has no targets")

    def match(self, key: str):
        return self.regex.fullmatch(key)

    def target_names(self, m) -> list:
        def sub(t):
            def one(g):
                name = g.group(1)
                try:
                    v = m.group(int(name) if name.isdigit() else name)
                except IndexError:
                    raise OpError(f"rule {self.pattern!r}: target {t!r} names group {{{name}}} "
                                  f"that the pattern does not have") from None
                return v if v is not None else ""
            return _GROUP.sub(one, t)
        return [sub(t) for t in self.targets]

    def __repr__(self):
        return f"Rule({self.pattern!r}, {self.targets!r}, {self.op.describe()})"

