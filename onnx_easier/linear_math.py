"""Exact fusion of chains of linear layers, in pure numpy (no ONNX, no graphs).

Every layer here is a ``ConvLayer``: ONNX ``Conv`` semantics (cross-correlation) over ``nd >= 0`` spatial axes,
``nd = 0`` being a dense layer ``y = W x + b`` on ``[N, C]``. Along one spatial axis a layer with kernel size ``k``,
stride ``s``, dilation ``d`` and pads ``(pb, pe)`` computes, per output position ``o``,

    y[o] = sum_t W[t] x[o*s + t*d - pb]            (x is zero outside 0 <= j < L)
    L_out = floor((L + pb + pe - d*(k-1) - 1) / s) + 1

**Linear part.** Substituting layer 1 into layer 2 (reading layer 1 on the zero-*extended* input, see below):

    z[o] = sum_{t2,t1} W2[t2] W1[t1] x[o*s1*s2 + t2*d2*s1 + t1*d1 - (pb1 + pb2*s1)]

so a chain composes, per axis, to stride ``S = prod s_i``, begin pad ``PB = sum pb_i * P_i`` and end pad
``PE = sum pe_i * P_i`` with ``P_i = s_0 * ... * s_{i-1}`` (product of the earlier strides), and a kernel whose tap
at offset ``u = sum t_i * d_i * P_i`` is the sum over all tap paths of the products of the (channel-mixed) taps:
``W[co, ci, u] = sum W_n[co, c_{n-1}, t_n] ... W_1[c_1, ci, t_1]``. The offsets span ``0 .. K-1`` with
``K = 1 + sum (k_i - 1) * d_i * P_i``; they are all multiples of ``g = gcd{d_i * P_i : k_i > 1}``, so the fused
kernel is stored with dilation ``g`` and ``(K-1)/g + 1`` taps (``g = 1`` is the dense kernel). Channels compose as
matrix products of the dense (``groups = 1``) forms, computed blockwise on the grouped forms (a depthwise or BN layer
is never densified), and the result is regrouped: the largest group count whose block-diagonal structure the fused
weight has (depthwise o depthwise stays depthwise, 1x1 o dw o 1x1 is dense). ``fused_layout`` gives the fused
geometry and cost without computing the weight.
With ``PE`` as above the fused layer has the chain's output size for *every* input size, thanks to
``floor((floor(a/s1) + c) / s2) = floor((a + c*s1) / (s1*s2))``.

**Border condition.** When a later layer ``i`` pads, the chain puts zeros in the ring of its input ``h_i`` around
the real extent, whereas the fused layer effectively evaluates the earlier layers there on the zero-padded input.
The two agree (for all inputs) iff every ring position of ``h_i`` that is read on the way to some output has a
receptive field, projected onto the chain's input (``j*P_i + U_i - PB_i`` with ``U_i`` the tap offsets of
layers ``0..i-1``), lying entirely outside the real input extent. This is checked exactly per axis with the sets of
positions each layer actually reads, and combined across axes (a ring position of an nd tensor fails only if its
receptive field meets the real input along every axis). Example: 1x1 stride-1 unpadded layers before a padding layer
always pass; 3x3 pad 1 followed by 3x3 pad 1 fails (the fused 5x5 would see real pixels where the chain sees zeros).
Without a known input size, a sufficient size-independent condition is used instead (see ``compose``).

**Constant part.** The chain is affine (zero padding is linear), so ``chain(x) = lin(x) + chain(0)``: once the linear
part is exact, the input-independent term is the chain evaluated on a zero input. It is uniform per channel when no
padding layer sees a non-zero constant; it is then computed analytically, ``c <- sum_taps(W_i) @ c + b_i``, and becomes
the fused bias. Otherwise it varies near the borders and is returned as a ``bias_map`` ``[Cout, *out_spatial]``
(only for a known input size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Composed",
    "ConvLayer",
    "Layout",
    "add_identity",
    "affine_layer",
    "bn_affine",
    "compose",
    "conv_forward",
    "conv_macs",
    "conv_params",
    "fused_layout",
    "make_layer",
    "output_spatial",
    "regroup",
    "to_dense",
]


def _frozen_array(value: np.ndarray) -> np.ndarray:
    array = np.array(value, dtype=np.float64, copy=True)
    array.flags.writeable = False
    return array


def _int_tuple(values: tuple[int, ...] | list[int] | np.ndarray, name: str) -> tuple[int, ...]:
    out = []
    for v in values:
        if int(v) != v:
            raise ValueError(f"{name} must be integers, got {tuple(values)}")
        out.append(int(v))
    return tuple(out)


@dataclass(frozen=True, eq=False)
class ConvLayer:
    """y = conv(pad(x), weight; strides, dilations, groups) + bias, over nd >= 0 spatial dims (nd = 0: a dense
    layer y = W x + b on [N, C]). ONNX Conv semantics (cross-correlation).

    The arrays are stored as read-only float64 copies; ``eq=False`` because numpy arrays have no truth value
    (layers compare and hash by identity).
    """

    weight: np.ndarray  # [Cout, Cin // groups, *kernel]
    bias: np.ndarray  # [Cout]
    strides: tuple[int, ...]  # len nd
    dilations: tuple[int, ...]  # len nd
    pads: tuple[int, ...]  # ONNX order: begin_0..begin_{nd-1}, end_0..end_{nd-1}
    groups: int = 1

    def __post_init__(self) -> None:
        weight = _frozen_array(self.weight)
        if weight.ndim < 2:
            raise ValueError(f"weight must be [Cout, Cin/groups, *kernel], got shape {weight.shape}")
        nd = weight.ndim - 2
        bias = _frozen_array(self.bias)
        strides = _int_tuple(self.strides, "strides")
        dilations = _int_tuple(self.dilations, "dilations")
        pads = _int_tuple(self.pads, "pads")
        groups = int(self.groups)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias shape {bias.shape} does not match Cout = {weight.shape[0]}")
        if len(strides) != nd or len(dilations) != nd or len(pads) != 2 * nd:
            raise ValueError(
                f"a {nd}-d layer needs {nd} strides, {nd} dilations and {2 * nd} pads, got {strides}, {dilations}, {pads}"
            )
        if min(strides, default=1) < 1 or min(dilations, default=1) < 1 or min(pads, default=0) < 0:
            raise ValueError(f"strides and dilations must be >= 1 and pads >= 0, got {strides}, {dilations}, {pads}")
        if groups < 1 or weight.shape[0] % groups:
            raise ValueError(f"groups = {groups} must be >= 1 and divide Cout = {weight.shape[0]}")
        if min(weight.shape[1:], default=1) < 1:
            raise ValueError(f"empty weight of shape {weight.shape}")
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "bias", bias)
        object.__setattr__(self, "strides", strides)
        object.__setattr__(self, "dilations", dilations)
        object.__setattr__(self, "pads", pads)
        object.__setattr__(self, "groups", groups)

    @property
    def nd(self) -> int:
        return self.weight.ndim - 2

    @property
    def cin(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def cout(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def pads_begin(self) -> tuple[int, ...]:
        return self.pads[: self.nd]

    @property
    def pads_end(self) -> tuple[int, ...]:
        return self.pads[self.nd :]

    @property
    def has_padding(self) -> bool:
        return any(self.pads)


@dataclass(frozen=True, eq=False)
class Composed:
    """The result of ``compose``.

    layer:    the single fused layer.
    bias_map: None, or ``[Cout, *out_spatial]``: an input-independent term that REPLACES ``layer.bias`` (which is
              then zeros), used when the constant part of the chain varies across positions (a padding layer saw a
              non-zero constant). Only produced for a known input size.
    """

    layer: ConvLayer
    bias_map: np.ndarray | None


def make_layer(
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    strides: tuple[int, ...] | None = None,
    dilations: tuple[int, ...] | None = None,
    pads: tuple[int, ...] | None = None,
    groups: int = 1,
) -> ConvLayer:
    """A ConvLayer with ONNX defaults: no bias, strides 1, dilations 1, pads 0. Casts to float64."""
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim < 2:
        raise ValueError(f"weight must be [Cout, Cin/groups, *kernel], got shape {weight.shape}")
    nd = weight.ndim - 2
    return ConvLayer(
        weight=weight,
        bias=np.zeros(weight.shape[0]) if bias is None else bias,
        strides=(1,) * nd if strides is None else tuple(strides),
        dilations=(1,) * nd if dilations is None else tuple(dilations),
        pads=(0,) * (2 * nd) if pads is None else tuple(pads),
        groups=groups,
    )


def affine_layer(scale: np.ndarray, shift: np.ndarray, nd: int) -> ConvLayer:
    """Per-channel ``y = scale * x + shift`` as a 1x..x1 depthwise layer (groups = C)."""
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    shift = np.asarray(shift, dtype=np.float64).reshape(-1)
    if scale.shape != shift.shape:
        raise ValueError(f"scale {scale.shape} and shift {shift.shape} differ in shape")
    channels = scale.shape[0]
    return make_layer(scale.reshape((channels, 1) + (1,) * nd), shift, groups=channels)


def bn_affine(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Inference BatchNormalization as ``scale * x + shift``: ``scale = gamma / sqrt(var + eps)``,
    ``shift = beta - mean * scale``."""
    gamma, beta, mean, var = (np.asarray(a, dtype=np.float64) for a in (gamma, beta, mean, var))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def output_spatial(layer: ConvLayer, in_spatial: tuple[int, ...]) -> tuple[int, ...]:
    """``floor((S + pb + pe - d*(k-1) - 1) / s) + 1`` per axis; raises ValueError for an empty output."""
    in_spatial = tuple(int(v) for v in in_spatial)
    if len(in_spatial) != layer.nd:
        raise ValueError(f"a {layer.nd}-d layer needs {layer.nd} spatial sizes, got {in_spatial}")
    out = tuple(
        (size + pb + pe - d * (k - 1) - 1) // s + 1
        for size, pb, pe, d, k, s in zip(
            in_spatial, layer.pads_begin, layer.pads_end, layer.dilations, layer.kernel, layer.strides
        )
    )
    if min(in_spatial, default=1) < 1 or min(out, default=1) < 1:
        raise ValueError(f"input {in_spatial} gives an empty output {out} for kernel {layer.kernel}")
    return out


def conv_forward(x: np.ndarray, layer: ConvLayer) -> np.ndarray:
    """Reference implementation on ``[N, Cin, *S]`` (float64), any nd incl. 0: one strided view of the padded input
    per kernel tap, contracted with that tap's grouped weight and accumulated."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != layer.nd + 2 or x.shape[1] != layer.cin:
        raise ValueError(f"input of shape {x.shape} does not fit a {layer.nd}-d layer with Cin = {layer.cin}")
    n, g = x.shape[0], layer.groups
    cin_g, cout_g = layer.cin // g, layer.cout // g
    weight = layer.weight.reshape((g, cout_g, cin_g) + layer.kernel)
    bias = layer.bias.reshape((-1,) + (1,) * layer.nd)
    if layer.nd == 0:
        return np.einsum("ngc,goc->ngo", x.reshape(n, g, cin_g), weight).reshape(n, layer.cout) + bias
    out = output_spatial(layer, x.shape[2:])
    padded = np.pad(x, [(0, 0), (0, 0)] + list(zip(layer.pads_begin, layer.pads_end)))
    padded = padded.reshape((n, g, cin_g) + padded.shape[2:])
    y = np.zeros((n, g, cout_g) + out)
    for tap in np.ndindex(*layer.kernel):
        index = tuple(
            slice(t * d, t * d + s * (o - 1) + 1, s) for t, d, s, o in zip(tap, layer.dilations, layer.strides, out)
        )
        y += np.einsum("ngc...,goc->ngo...", padded[(slice(None),) * 3 + index], weight[(Ellipsis,) + tap])
    return y.reshape((n, layer.cout) + out) + bias


def _coarsen(weight: np.ndarray, groups: int, to: int) -> np.ndarray:
    """A grouped weight ``[Cout, Cin/groups, *k]`` re-expressed with ``to`` groups, ``to`` dividing ``groups``
    (each new group holds ``groups/to`` old ones on its block diagonal); ``to = 1`` is the dense weight."""
    if to == groups:
        return weight
    cout, cin_g = weight.shape[:2]
    per = groups // to
    old_group = np.arange(cout) // (cout // groups)
    columns = (old_group % per)[:, None] * cin_g + np.arange(cin_g)  # position inside the new, wider group
    out = np.zeros((cout, cin_g * per) + weight.shape[2:])
    out[np.arange(cout)[:, None], columns] = weight
    return out


def to_dense(layer: ConvLayer) -> ConvLayer:
    """The same layer with groups = 1 (block-diagonal weight)."""
    if layer.groups == 1:
        return layer
    return ConvLayer(_coarsen(layer.weight, layer.groups, 1), layer.bias, layer.strides, layer.dilations, layer.pads)


def _connectivity(layer: ConvLayer) -> np.ndarray:
    """[Cout, Cin] boolean: does output channel o read input channel c with any non-zero tap."""
    nonzero = np.any(layer.weight.reshape(layer.cout, layer.weight.shape[1], -1) != 0, axis=2)
    return _coarsen(nonzero, layer.groups, 1) != 0


def _block_diagonal(conn: np.ndarray, g: int) -> bool:
    """Whether the [Cout, Cin] connectivity has no entry outside ``g`` diagonal blocks."""
    cout, cin = conn.shape
    if g == 1:
        return True
    if conn[0, -1] or conn[-1, 0]:  # an entry in a corner block: short cut (dense layers, every g > 1)
        return False
    blocks = conn.reshape(g, cout // g, g, cin // g).any(axis=(1, 3))
    return not np.any(blocks & ~np.eye(g, dtype=bool))


def _gather_groups(layer: ConvLayer, g: int) -> np.ndarray:
    """The weight in ``g``-group form, read from the grouped form without densifying. Only valid when the dense
    weight is block diagonal with ``g`` blocks (entries outside both group structures are zero)."""
    cout, cin_old = layer.cout, layer.weight.shape[1]
    cin_new = layer.cin // g
    rows = np.arange(cout)[:, None]
    columns = (rows // (cout // g)) * cin_new + np.arange(cin_new)  # input channel, [Cout, Cin/g]
    local = columns - (rows // (cout // layer.groups)) * cin_old  # its index in the old group of the row
    inside = (local >= 0) & (local < cin_old)
    weight = layer.weight[rows, np.clip(local, 0, cin_old - 1)]
    return np.where(inside.reshape(inside.shape + (1,) * layer.nd), weight, 0.0)


def regroup(layer: ConvLayer) -> ConvLayer:
    """The grouped form with the largest group count g (g | Cin, g | Cout) whose block-diagonal structure
    (g blocks) the dense weight has. Exact: only zero weights are dropped."""
    conn = _connectivity(layer)
    common = math.gcd(layer.cin, layer.cout)
    for g in sorted((v for v in range(1, common + 1) if common % v == 0), reverse=True):
        if g == layer.groups:
            return layer
        if _block_diagonal(conn, g):
            return ConvLayer(_gather_groups(layer, g), layer.bias, layer.strides, layer.dilations, layer.pads, g)
    raise AssertionError("unreachable: g = 1 is always block diagonal")


def conv_macs(layer: ConvLayer, out_spatial: tuple[int, ...]) -> int:
    """Multiply-accumulates per sample: ``Cout * (Cin/groups) * prod(kernel) * prod(out_spatial)``."""
    return int(layer.weight.size) * math.prod(int(v) for v in out_spatial)


def conv_params(layer: ConvLayer) -> int:
    """Parameter count: ``weight.size + Cout``."""
    return int(layer.weight.size) + layer.cout


# --------------------------------------------------------------------------------------------------------------------
# composition


def _check_chain(layers: list[ConvLayer], in_spatial: tuple[int, ...] | None) -> None:
    if not layers:
        raise ValueError("compose needs at least one layer")
    nd = layers[0].nd
    for i, layer in enumerate(layers):
        if layer.nd != nd:
            raise ValueError(f"layer {i} is {layer.nd}-d but layer 0 is {nd}-d")
        if i and layer.cin != layers[i - 1].cout:
            raise ValueError(f"layer {i} expects {layer.cin} channels but layer {i - 1} gives {layers[i - 1].cout}")
    if in_spatial is not None and len(in_spatial) != nd:
        raise ValueError(f"in_spatial {tuple(in_spatial)} does not have {nd} sizes")


def _chain_sizes(layers: list[ConvLayer], in_spatial: tuple[int, ...]) -> list[tuple[int, ...]] | str:
    sizes = [tuple(int(v) for v in in_spatial)]
    for i, layer in enumerate(layers):
        try:
            sizes.append(output_spatial(layer, sizes[-1]))
        except ValueError as err:
            return f"layer {i} has an empty output at this input size: {err}"
    return sizes


@dataclass(frozen=True)
class _AxisPrefix:
    """Layers ``0..i-1`` composed along one axis: stride, begin/end pads, sorted reachable tap offsets."""

    stride: int
    pad_begin: int
    pad_end: int
    offsets: np.ndarray

    @property
    def span(self) -> int:
        return int(self.offsets[-1])


def _axis_prefixes(layers: list[ConvLayer], axis: int) -> list[_AxisPrefix]:
    """Entry i describes layers[:i] along ``axis`` (entry 0 is the identity, entry n the whole chain)."""
    stride, pad_begin, pad_end = 1, 0, 0
    offsets = np.zeros(1, dtype=np.int64)
    prefixes = [_AxisPrefix(stride, pad_begin, pad_end, offsets)]
    nd = layers[0].nd
    for layer in layers:
        k, d = layer.kernel[axis], layer.dilations[axis]
        offsets = np.unique((offsets[:, None] + np.arange(k) * d * stride).ravel())
        pad_begin += layer.pads[axis] * stride
        pad_end += layer.pads[nd + axis] * stride
        stride *= layer.strides[axis]
        prefixes.append(_AxisPrefix(stride, pad_begin, pad_end, offsets))
    return prefixes


def _border_reason_known(layers: list[ConvLayer], sizes: list[tuple[int, ...]]) -> str | None:
    """Exact border check for a known input size (see the module docstring); None when exact."""
    nd, n = layers[0].nd, len(layers)
    prefixes = [_axis_prefixes(layers, a) for a in range(nd)]
    extent = sizes[0]
    needed = [np.arange(sizes[n][a]) for a in range(nd)]  # real positions of h_{i+1} that some output depends on
    for i in range(n - 1, 0, -1):
        layer = layers[i]
        hits: list[bool] = []
        ring_hits: list[np.ndarray] = []
        next_needed: list[np.ndarray] = []
        for a in range(nd):
            k, d, s, pb = layer.kernel[a], layer.dilations[a], layer.strides[a], layer.pads[a]
            read = np.unique((needed[a][:, None] * s + np.arange(k) * d - pb).ravel())
            ring = (read < 0) | (read >= sizes[i][a])
            prefix = prefixes[a][i]
            low = read * prefix.stride - prefix.pad_begin  # receptive field: low + offsets
            first = np.searchsorted(prefix.offsets, -low)
            clipped = prefix.offsets[np.minimum(first, prefix.offsets.size - 1)]
            hit = (first < prefix.offsets.size) & (clipped < extent[a] - low)
            hits.append(bool(hit.any()))
            ring_hits.append(read[ring & hit])
            next_needed.append(read[~ring])
        for a in range(nd):
            if ring_hits[a].size and all(hits[b] for b in range(nd) if b != a):
                shown = ", ".join(str(int(v)) for v in ring_hits[a][:4])
                return (
                    f"layer {i} zero-pads its input on axis {a} (pads {layer.pads[a]}, {layer.pads[nd + a]}), but the "
                    f"earlier layers' receptive field at padded position(s) {shown} (input size {sizes[i][a]}) "
                    f"reaches the real input: the chain sees zeros there, a single fused layer would see data"
                )
        needed = next_needed
    return None


def _border_reason_unknown(layers: list[ConvLayer]) -> str | None:
    """Size-independent sufficient border check: padded positions project entirely outside any input extent."""
    nd = layers[0].nd
    for a in range(nd):
        prefixes = _axis_prefixes(layers, a)
        for i in range(1, len(layers)):
            layer, prefix = layers[i], prefixes[i]
            k, d, s, pb, pe = layer.kernel[a], layer.dilations[a], layer.strides[a], layer.pads[a], layer.pads[nd + a]
            if pb > 0:
                # last padded position before the input that layer i reads: base + s * o for the largest o keeping < 0
                last = max(t * d - pb + s * ((pb - t * d - 1) // s) for t in range(k) if t * d < pb)
                if last * prefix.stride + prefix.span - prefix.pad_begin >= 0:
                    return (
                        f"layer {i} zero-pads its input at the start of axis {a} (pad {pb}), but the earlier layers' "
                        f"receptive field at padded position {last} reaches the real input: the chain sees zeros "
                        f"there, a single fused layer would see data"
                    )
            if pe > 0 and prefix.pad_end < prefix.span:
                # position L_i projects to >= L_0 for every L_0 iff PE_i >= span_i (see compose)
                return (
                    f"layer {i} zero-pads its input at the end of axis {a} (pad {pe}), and for some input sizes the "
                    f"earlier layers' receptive field at the first padded position reaches the real input "
                    f"(end pad {prefix.pad_end} < span {prefix.span}); give in_spatial to check the actual size"
                )
    return None


def _fused_geometry(layers: list[ConvLayer]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Strides, dilations (``gcd{d_i * P_i : k_i > 1}``) and ONNX pads of the fused layer."""
    nd = layers[0].nd
    prefixes = [_axis_prefixes(layers, a)[-1] for a in range(nd)]
    dilations = []
    for a in range(nd):
        steps, before = [], 1
        for layer in layers:
            if layer.kernel[a] > 1:
                steps.append(layer.dilations[a] * before)
            before *= layer.strides[a]
        dilations.append(math.gcd(*steps) if steps else 1)
    strides = tuple(p.stride for p in prefixes)
    pads = tuple(p.pad_begin for p in prefixes) + tuple(p.pad_end for p in prefixes)
    return strides, tuple(dilations), pads


@dataclass(frozen=True)
class Layout:
    """The geometry of a layer without its weights: what ``compose`` produces for a chain, found structurally by
    ``fused_layout`` at the cost of a few boolean channel products (to weigh a fusion before computing it)."""

    cout: int
    cin: int
    groups: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]

    @property
    def params(self) -> int:
        """``weight.size + Cout``, as ``conv_params``."""
        return self.cout * (self.cin // self.groups) * math.prod(self.kernel) + self.cout

    def macs(self, out_spatial: tuple[int, ...]) -> int:
        """Per sample, as ``conv_macs``."""
        return self.cout * (self.cin // self.groups) * math.prod(self.kernel) * math.prod(out_spatial)


def fused_layout(layers: list[ConvLayer]) -> Layout:
    """The layout of the layer ``compose(layers, ...)`` would return (when it does not refuse), without computing it.
    Groups come from the structural channel connectivity; ``compose`` regroups by value and can only find more
    groups, when products cancel exactly."""
    _check_chain(layers, None)
    if len(layers) == 1:
        layer = layers[0]
        return Layout(layer.cout, layer.cin, layer.groups, layer.kernel, layer.strides, layer.dilations, layer.pads)
    strides, dilations, pads = _fused_geometry(layers)
    spans = [_axis_prefixes(layers, a)[-1].span for a in range(layers[0].nd)]
    kernel = tuple(span // d + 1 for span, d in zip(spans, dilations))
    conn = _connectivity(layers[0])
    for layer in layers[1:]:
        conn = _reach(layer, conn)
    cin, cout = layers[0].cin, layers[-1].cout
    common = math.gcd(cin, cout)
    groups = next(g for g in range(common, 0, -1) if common % g == 0 and _block_diagonal(conn, g))
    return Layout(cout, cin, groups, kernel, strides, dilations, pads)


def _reach(layer: ConvLayer, conn: np.ndarray) -> np.ndarray:
    """[Cout, C0] boolean: the input channels of a chain (connectivity ``conn``, [Cin, C0]) that each output channel
    of ``layer`` placed after it reads. A boolean matrix product, short-cut for a layer with one channel per group
    (a row mask) and for one whose every output reads every input (each row is the union of ``conn``'s rows): the
    layers of large MLPs, where the product is an 8192^3 multiplication per candidate segment."""
    if layer.groups == layer.cin == layer.cout:
        return conn & np.any(layer.weight.reshape(layer.cout, -1) != 0, axis=1)[:, None]
    step = _connectivity(layer)
    if step.all():
        return np.broadcast_to(conn.any(axis=0), (layer.cout, conn.shape[1]))
    return step.astype(np.float32) @ conn.astype(np.float32) > 0  # exact: counts below 2^24


def _fuse_linear(layers: list[ConvLayer]) -> ConvLayer:
    """The composed linear part (zero bias, regrouped, compressed dilation), ignoring the border condition.

    The accumulated weight stays grouped. Composing an accumulated ``ga``-group weight with a ``gb``-group layer gives
    ``h = gcd(ga, gb)`` groups; when ``ga | gb`` or ``gb | ga`` it is contracted blockwise without densifying either
    side (``r = ga/gb`` accumulated groups feed each layer group, or each layer group reads one slice of an
    accumulated group), otherwise the accumulated weight is first re-expressed with ``h`` groups. So depthwise chains,
    BN folds and pointwise-depthwise pairs never build a dense ``C x C`` kernel. A chain of dense layers (Gemm/MatMul)
    and per-channel scalings is ``_dense_chain``."""
    dense = _dense_chain(layers)
    if dense is not None:
        return regroup(ConvLayer(dense, np.zeros(dense.shape[0]), (), (), (), 1))
    weight, groups = _redilate(layers[0], (1,) * layers[0].nd), layers[0].groups  # [C1, C0/groups, *K], offsets 0..K-1
    stride = np.array(layers[0].strides, dtype=np.int64)
    for layer in layers[1:]:
        gb = layer.groups
        if gb % groups and groups % gb:
            weight, groups = _coarsen(weight, groups, math.gcd(groups, gb)), math.gcd(groups, gb)
        r = groups // gb if groups % gb == 0 else 1  # accumulated groups per layer group
        c2, c1, c0 = layer.cout, layer.cin, weight.shape[1] * groups
        acc = weight.reshape((gb, r, c1 // (gb * r), c0 // groups) + weight.shape[2:])
        step = layer.weight.reshape((gb, c2 // gb, r, c1 // (gb * r)) + layer.kernel)
        kernel, dilation = np.array(layer.kernel), np.array(layer.dilations)
        size = np.array(weight.shape[2:]) + (kernel - 1) * dilation * stride
        fused = np.zeros((gb, c2 // gb, r, c0 // groups) + tuple(int(v) for v in size))
        for tap in np.ndindex(*layer.kernel):
            begin = np.array(tap, dtype=np.int64) * dilation * stride
            index = tuple(slice(int(b), int(b) + e) for b, e in zip(begin, weight.shape[2:]))
            fused[(slice(None),) * 4 + index] += np.einsum(
                "jorc,jrci...->jori...", step[(Ellipsis,) + tap], acc, optimize=True
            )
        weight, groups = fused.reshape((c2, r * (c0 // groups)) + fused.shape[4:]), min(groups, gb)
        stride = stride * np.array(layer.strides, dtype=np.int64)
    strides, dilations, pads = _fused_geometry(layers)
    weight = weight[(slice(None), slice(None)) + tuple(slice(None, None, g) for g in dilations)]
    linear = ConvLayer(weight, np.zeros(weight.shape[0]), strides, dilations, pads, groups)
    return regroup(linear)


def _dense_chain(layers: list[ConvLayer]) -> np.ndarray | None:
    """``W_n ... W_1`` for a chain of dense layers (nd = 0, one group) and per-channel scalings (one channel per
    group) with at least one dense layer: one matrix product per dense layer, the scalings applied to the rows or
    columns in place, and no other temporary (an 8192 x 8192 chain of a model over 2 GB must not hold its float64
    weights several times over). None for any other chain."""
    if not all(v.nd == 0 and (v.groups == 1 or v.groups == v.cin == v.cout) for v in layers) or all(
            v.groups != 1 for v in layers):
        return None
    scale = np.ones(layers[0].cin)  # scalings before the first dense layer: its columns
    weight: np.ndarray | None = None
    for layer in layers:
        if layer.groups == 1:
            weight = layer.weight * scale if weight is None else layer.weight @ weight
        elif weight is None:
            scale = scale * layer.weight[:, 0]
        else:
            weight *= layer.weight[:, :1]  # our own array: made by the product above
    return weight


def _apply_channels(layer: ConvLayer, vector: np.ndarray) -> np.ndarray:
    """The layer's linear map on a spatially uniform input: ``sum_taps(W) @ vector`` (grouped)."""
    g = layer.groups
    summed = layer.weight.reshape(layer.cout, layer.weight.shape[1], -1).sum(axis=2)
    summed = summed.reshape(g, layer.cout // g, -1)
    return np.einsum("goc,gc->go", summed, vector.reshape(g, -1)).reshape(-1)


def _uniform_prefix(layers: list[ConvLayer]) -> tuple[int, np.ndarray]:
    """The chain's response to a zero input, propagated analytically as ``c <- sum_taps(W) @ c + b`` while it is
    uniform per channel, i.e. until a padding layer sees a non-zero constant: ``(i, c)`` with ``c`` the (uniform)
    input of layer ``i``; ``i == len(layers)`` when the whole response is uniform (``c`` is then the output)."""
    constant = np.zeros(layers[0].cin)
    for i, layer in enumerate(layers):
        if layer.has_padding and np.any(constant != 0):
            return i, constant
        constant = _apply_channels(layer, constant) + layer.bias
    return len(layers), constant


def compose(layers: list[ConvLayer], in_spatial: tuple[int, ...] | None) -> Composed | str:
    """One layer equivalent to applying ``layers[0]``, then ``layers[1]``, ..., or a reason (in words) why a single
    layer cannot be exact.

    ``in_spatial`` is the chain's input size (None when unknown; ignored for nd = 0). The fused layer has the chain's
    output size for every input size. With a known size the border condition is checked exactly; without, the
    sufficient condition is: for every later layer i that pads, the last padded position it reads before the input
    projects (through layers 0..i-1) entirely before the input, and at the end ``PE_i >= span_i`` (the earlier
    layers' accumulated end pad covers their receptive-field span), which places the first padded position after
    the input for every input size. A constant part that varies across positions (a padding layer sees a non-zero
    constant) needs ``in_spatial`` and is returned as ``bias_map``. Mismatched layers raise ValueError.
    """
    _check_chain(layers, in_spatial)
    if len(layers) == 1:
        return Composed(layers[0], None)
    nd = layers[0].nd
    if nd == 0:
        in_spatial = ()
    sizes = None
    if in_spatial is not None:
        sizes = _chain_sizes(layers, tuple(in_spatial))
        if isinstance(sizes, str):
            return sizes
        reason = _border_reason_known(layers, sizes)
    else:
        reason = _border_reason_unknown(layers)
    if reason is not None:
        return reason
    linear = _fuse_linear(layers)
    bias_map = None
    first, bias = _uniform_prefix(layers)
    if first < len(layers):
        if sizes is None:
            return (
                f"layer {first} pads an input that carries a non-zero constant (upstream bias), so the fused constant "
                f"term varies near the borders; give in_spatial to compute it as a bias map"
            )
        constant = np.broadcast_to(bias.reshape((1, -1) + (1,) * nd), (1, bias.size) + sizes[first])
        for layer in layers[first:]:
            constant = conv_forward(constant, layer)
        flat = constant[0].reshape(constant.shape[1], -1)
        if np.all(np.ptp(flat, axis=1) <= 1e-12 * max(1.0, float(np.abs(flat).max()))):
            bias = flat.mean(axis=1)
        else:
            bias, bias_map = np.zeros(constant.shape[1]), constant[0]
            bias_map.flags.writeable = False
    fused = ConvLayer(linear.weight, bias, linear.strides, linear.dilations, linear.pads, linear.groups)
    if sizes is not None and output_spatial(fused, sizes[0]) != sizes[-1]:
        raise AssertionError(f"fused output size {output_spatial(fused, sizes[0])} != chain's {sizes[-1]}")
    return Composed(fused, bias_map)


def add_identity(layer: ConvLayer, in_spatial: tuple[int, ...] | None) -> ConvLayer | str:
    """``y = x + layer(x)`` as one layer, or the reason it cannot be one.

    Needs Cin == Cout, all strides 1, an output the size of the input (``pb + pe == d*(k-1)`` per axis, which with
    stride 1 is the same check for every input size, so ``in_spatial`` is only validated), and a tap that reads the
    input at the output's own position, ``t*d == pb`` per axis (when ``pb`` is not a multiple of ``d`` the kernel is
    first put on the finer tap grid of dilation ``gcd(d, pb)``, zeros in between); that tap gets ``+1`` on the diagonal
    channel (``weight[c, c mod (Cin/groups), t] += 1``, so depthwise stays depthwise). The layer is a plain ConvLayer:
    a ``bias_map`` from ``compose`` is not part of it and must be added separately by the caller.
    """
    nd = layer.nd
    if layer.cin != layer.cout:
        return f"the residual needs Cin == Cout, got {layer.cin} -> {layer.cout}"
    if any(s != 1 for s in layer.strides):
        return f"the residual needs stride 1, got strides {layer.strides}"
    if in_spatial is not None and nd:
        try:
            out = output_spatial(layer, tuple(in_spatial))
        except ValueError as err:
            return f"the layer has an empty output: {err}"
        if out != tuple(in_spatial):
            return f"the layer maps size {tuple(in_spatial)} to {out}, the residual needs the same size"
    dilations = []
    for a in range(nd):
        k, d, pb, pe = layer.kernel[a], layer.dilations[a], layer.pads[a], layer.pads[nd + a]
        if pb + pe != d * (k - 1):
            return f"the layer changes the size of axis {a} (pads {pb}+{pe} != dilation*(kernel-1) = {d * (k - 1)})"
        dilations.append(math.gcd(d, pb) if pb else d)
    weight = _redilate(layer, tuple(dilations))
    tap = tuple(pb // d for pb, d in zip(layer.pads_begin, dilations))
    channels = np.arange(layer.cout)
    weight[(channels, channels % weight.shape[1]) + tap] += 1.0
    return ConvLayer(weight, layer.bias, layer.strides, tuple(dilations), layer.pads, layer.groups)


def _redilate(layer: ConvLayer, dilations: tuple[int, ...]) -> np.ndarray:
    """A writable copy of the weight on a finer tap grid: dilation ``d'`` dividing ``d`` per axis, kernel
    ``(k-1)*d/d' + 1``, zeros on the new in-between taps (same function, same output size)."""
    factors = [d // new for d, new in zip(layer.dilations, dilations)]
    size = tuple((k - 1) * f + 1 for k, f in zip(layer.kernel, factors))
    weight = np.zeros(layer.weight.shape[:2] + size)
    weight[(slice(None), slice(None)) + tuple(slice(None, None, f) for f in factors)] = layer.weight
    return weight
