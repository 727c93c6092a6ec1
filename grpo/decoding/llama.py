"""One decode step of a Llama-family model (torch, or one C call), over a KV cache that shares
prompts.

Owns the fast path of `grpo.decoding` for the architectures whose decoder layer is exactly
RMSNorm -> attention (q/k/v/o projections, rotary, grouped-query) -> RMSNorm -> gated MLP:
`llama` and `qwen2` (SmolLM2 and Qwen2.5). It computes what the HF modules compute, with the
model's own weights, rotary embedding and activation, and less work around it:

- the G samples of a prompt read that prompt's keys and values once per step: the cache holds
  each prompt's KV once (B rows) and each sample's own completion KV (B·G rows); a query row
  scores [its prompt's keys, its own keys] and one softmax covers both, which is exactly
  attention over the concatenated sequence;
- the residual stream is kept transposed (hidden, rows), so every linear layer is one
  weight-stationary GEMM W @ x, run by `grpo.kernels.skinny_gemm` on CPU (MKL, its fallback,
  also runs W @ x^T faster than x @ W^T at a few rows);
- no masks, cache objects, hooks or output classes are built per step;
- on CPU in fp32, where `grpo.kernels` is built (`fused_applies`), all decoder layers of a step
  run in one call of `csrc/llama_step.c`: the ~40 torch ops per layer around the GEMMs cost
  more dispatch time than arithmetic at 16-64 rows. The torch code below stays for GPUs, other
  dtypes and machines without the kernels, and both are tested against the HF forward.

The prompts are prefilled by `grpo.decoding.packed_prefill`. `supported` says whether a model
qualifies; everything else takes the HF path (`grpo.decoding.hf_steps`).
"""

from __future__ import annotations

import ctypes

import torch
from transformers import PreTrainedModel
from transformers.activations import SiLUActivation

from grpo import kernels
from grpo.decoding.packed_prefill import left_padded
from grpo.kernels import skinny_gemm
from grpo.kernels.skinny_gemm import column_width

ARCHITECTURES = ("llama", "qwen2")
LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
ATTENTION_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj"}


def supported(model: torch.nn.Module) -> bool:
    """True when `model` is a plain (not wrapped, not adapted) llama/qwen2 causal LM with full
    attention in every layer and nothing in its layers we do not reproduce."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in ARCHITECTURES:
        return False
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return False
    if getattr(config, "pretraining_tp", 1) != 1:
        return False
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if layers is None or type(getattr(model, "lm_head", None)) is not torch.nn.Linear:
        return False
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
        linears += (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(m) is not torch.nn.Linear for m in linears):
            return False
        if set(layer._modules) != LAYER_PARTS or set(attn._modules) != ATTENTION_PARTS:
            return False
    return True


SILU = (torch.nn.SiLU, SiLUActivation)  # the activations csrc/llama_step.c computes


def _linear(weight: torch.Tensor, bias, x: torch.Tensor, n: int) -> torch.Tensor:
    """x.T @ weight.T + bias, transposed: first n columns of x (in, width) -> (out, n)."""
    out = skinny_gemm.mm(weight, x)[:, :n]  # (out, n)
    return out if bias is None else out + bias[:, None]


def _logits(weight: torch.Tensor, bias, x: torch.Tensor, n: int) -> torch.Tensor:
    """The LM head on the first n columns of x (C, width): logits (n, V), one row per sequence
    (the kernel writes them so, sparing the copy a transpose of a (V, n) result would make)."""
    logits = skinny_gemm.mm(weight, x, transposed=True)[:n]  # (n, V)
    return logits if bias is None else logits + bias


def _rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm of (n, hidden) rows (one fused op)."""
    return torch.nn.functional.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def gemm_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the decode steps' GEMMs run in: the autocast dtype where autocast is on for the
    weights' device and would cast them (fp32), else the weights' own."""
    weight = model.lm_head.weight
    device = weight.device.type
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`tensor` in `dtype` (itself when it already is)."""
    return None if tensor is None else tensor.to(dtype)


def _stack(linears, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weights (and biases, zeros where one has none) of linears on the same input, stacked,
    in `dtype`."""
    weight = torch.cat([m.weight.to(dtype) for m in linears])  # (sum out, in)
    if all(m.bias is None for m in linears):
        return weight, None
    zeros = linears[0].weight.new_zeros
    biases = [zeros(m.out_features) if m.bias is None else m.bias for m in linears]
    return weight, torch.cat(biases).to(dtype)


class _Fused:
    """A layer's q/k/v and gate/up projections stacked, so each group is one GEMM, and its o and
    down projections, all in the steps' GEMM dtype: built once per decode (the policy changes
    between rollouts; autocast would cast the stacked weights again at every step, as they are
    no parameters it caches), freed with it. In the weights' own dtype they are the weights."""

    def __init__(self, layer: torch.nn.Module, dtype: torch.dtype) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
        self.qkv, self.qkv_bias = _stack(qkv, dtype)  # ((H+2Hkv)D, C)
        self.gate_up, self.gate_up_bias = _stack((mlp.gate_proj, mlp.up_proj), dtype)  # (2·I, C)
        self.o, self.o_bias = _cast(attn.o_proj.weight, dtype), _cast(attn.o_proj.bias, dtype)
        down = mlp.down_proj
        self.down, self.down_bias = _cast(down.weight, dtype), _cast(down.bias, dtype)


def _rotate(xt: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (heads, D, n) with cos/sin (D, n), as HF's `apply_rotary_pos_emb`."""
    half = xt.shape[1] // 2
    rotated = torch.cat([-xt[:, half:], xt[:, :half]], dim=1)  # (heads, D, n)
    return xt * cos + rotated * sin


class _Shape(ctypes.Structure):
    """The `Shape` struct of csrc/llama_step.c."""

    _fields_ = [
        (name, ctypes.c_long)
        for name in (
            "layers",
            "hidden",
            "heads",
            "kv_heads",
            "head_dim",
            "inner",
            "groups",
            "group",
            "prefix",
            "capacity",
            "n",
            "width",
            "t",
        )
    ] + [("eps", ctypes.c_float), ("scaling", ctypes.c_float), ("threads", ctypes.c_int)]


def _pointer(tensor: torch.Tensor | None) -> int | None:
    """The address of a tensor's data, None (a NULL pointer) for no tensor."""
    return None if tensor is None else tensor.data_ptr()


def fused_applies(model: PreTrainedModel, prompt_mask: torch.Tensor) -> bool:
    """True when `csrc/llama_step.c` runs the decoder layers of this decode: the kernel library
    is built, everything is contiguous fp32 on the CPU without autocast, the activation is SiLU,
    every RMSNorm has the same epsilon, rotary covers the whole head and the prompts are
    left-padded."""
    layers = model.model.layers
    norms = [m for layer in layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    norms.append(model.model.norm)
    if not (
        kernels.library() is not None
        and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
        and all(p.is_contiguous() for p in model.parameters())
        and not torch.is_autocast_enabled("cpu")
        and all(type(layer.mlp.act_fn) in SILU for layer in layers)
        and len({m.variance_epsilon for m in norms}) == 1
        and len({layer.self_attn.scaling for layer in layers}) == 1
        and getattr(model.config, "partial_rotary_factor", 1.0) == 1.0
    ):
        return False
    return left_padded(prompt_mask)


class SharedPrefixSteps:
    """Decode state of B prompts x G samples: prompt KV once per prompt, own KV per sample.

    Built from the KV of a prefill over the B prompts (`prefill`: per layer (B, Hkv, P, D),
    left-padded as the prompts); `step` feeds one token per held
    row and returns the next-token logits. Rows are numbered 0..B·G-1, G consecutive rows per
    prompt; `alive` lists the rows the state holds (in order; see `should_drop`).
    """

    def __init__(self, model: PreTrainedModel, keys, values, prompt_mask, G, capacity):
        config = model.config
        self.model = model
        self.layers = model.model.layers
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.G = G
        self.prefix_keys = list(keys)  # L x (B, Hkv, P, D)
        self.prefix_values = list(values)  # L x (B, Hkv, P, D)
        B, P = prompt_mask.shape
        self.B, self.N = B, B * G
        shape = (self.N, self.kv_heads, capacity, self.head_dim)
        self.own_keys = [k.new_zeros(shape) for k in self.prefix_keys]  # L x (n, Hkv, C, D)
        self.own_values = [v.new_zeros(shape) for v in self.prefix_values]  # L x (n, Hkv, C, D)
        self.length = 0  # completion tokens in the own cache
        self.operands: dict[tuple[int, int], torch.Tensor] = {}  # (K, width) -> GEMM operand
        self.alive = torch.arange(self.N, device=prompt_mask.device)  # (n,)
        self.dtype = gemm_dtype(model)  # of every GEMM operand, weights cast once here
        self.fused = [_Fused(layer, self.dtype) for layer in self.layers]
        head = model.lm_head
        self.head, self.head_bias = _cast(head.weight, self.dtype), _cast(head.bias, self.dtype)
        self.kernel = fused_applies(model, prompt_mask)
        if self.kernel:
            self.prefix_keys = [k.contiguous() for k in self.prefix_keys]
            self.prefix_values = [v.contiguous() for v in self.prefix_values]
            self.first = (P - prompt_mask.sum(dim=1)).long().contiguous()  # (B,)
            self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # width -> (x, scratch)
            layer = self.layers[0]
            self.shape = _Shape(  # what stays fixed over the decode; `_kernel_step` sets the rest
                layers=len(self.layers),
                hidden=config.hidden_size,
                heads=self.heads,
                kv_heads=self.kv_heads,
                head_dim=self.head_dim,
                inner=layer.mlp.down_proj.in_features,
                groups=B,
                group=G,
                prefix=P,
                capacity=capacity,
                eps=layer.input_layernorm.variance_epsilon,
                scaling=layer.self_attn.scaling,
            )
            self._point()
        else:  # the torch step's attention: -inf on each prompt's left padding
            pad = self.prefix_keys[0].new_zeros(B, 1, 1, P)
            self.prefix_bias = pad.masked_fill(~prompt_mask.bool()[:, None, None, :], float("-inf"))

    def should_drop(self, live: int, held: int) -> bool:
        """Drop finished rows only when the live ones fit in fewer GEMM column blocks: below
        that a finished row costs a little attention and no GEMM time (the columns are padded to
        COLUMN_BLOCK anyway), while dropping turns every later step's attention into the
        scatter/gather path for a partial group grid."""
        return column_width(live) < column_width(held)

    def drop(self, keep: torch.Tensor) -> None:
        """Keep only the live rows at positions `keep` (indices into the current live rows)."""
        self.alive = self.alive[keep]
        self.own_keys = [k[keep] for k in self.own_keys]
        self.own_values = [v[keep] for v in self.own_values]
        if self.kernel:
            self._point()

    def _point(self) -> None:
        """The kernel's per-layer pointer table (in csrc/llama_step.c's slot order)."""
        pointers = []
        for i, layer in enumerate(self.layers):
            fused = self.fused[i]
            pointers += [
                layer.input_layernorm.weight.data_ptr(),
                fused.qkv.data_ptr(),
                _pointer(fused.qkv_bias),
                fused.o.data_ptr(),
                _pointer(fused.o_bias),
                layer.post_attention_layernorm.weight.data_ptr(),
                fused.gate_up.data_ptr(),
                _pointer(fused.gate_up_bias),
                fused.down.data_ptr(),
                _pointer(fused.down_bias),
                self.prefix_keys[i].data_ptr(),
                self.prefix_values[i].data_ptr(),
                self.own_keys[i].data_ptr(),
                self.own_values[i].data_ptr(),
            ]
        self.pointers = (ctypes.c_void_p * len(pointers))(*pointers)

    @torch.no_grad()
    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Next-token logits (n, V) after feeding `token` (n,) at `position` (n,) to live rows."""
        if self.kernel:
            return self._kernel_step(token, position)
        model, t = self.model, self.length
        n, D, H, Hkv = token.shape[0], self.head_dim, self.heads, self.kv_heads
        x = model.model.embed_tokens(token)  # (n, C)
        cos, sin = model.model.rotary_emb(x, position[None])  # (1, n, D)
        cos, sin = cos[0].t(), sin[0].t()  # (D, n)
        for i, layer in enumerate(self.layers):
            attn, mlp, fused = layer.self_attn, layer.mlp, self.fused[i]
            h = self._operand(_rms_norm(layer.input_layernorm, x).t())  # (C, width)
            qkv = _linear(fused.qkv, fused.qkv_bias, h, n).view(H + 2 * Hkv, D, n)
            qk = _rotate(qkv[: H + Hkv], cos, sin)  # (H + Hkv, D, n)
            self.own_keys[i][:, :, t] = qk[H:].permute(2, 0, 1)
            self.own_values[i][:, :, t] = qkv[H + Hkv :].permute(2, 0, 1)
            out = self._attention(i, qk[:H].permute(2, 0, 1), attn.scaling, t + 1)  # (n, H, D)
            x = x + _linear(fused.o, fused.o_bias, self._operand(out.reshape(n, -1).t()), n).t()
            h = self._operand(_rms_norm(layer.post_attention_layernorm, x).t())  # (C, width)
            gate_up = _linear(fused.gate_up, fused.gate_up_bias, h, n)  # (2·I, n)
            inner = gate_up.shape[0] // 2
            gated = mlp.act_fn(gate_up[:inner]) * gate_up[inner:]  # (I, n)
            x = x + _linear(fused.down, fused.down_bias, self._operand(gated), n).t()  # (n, C)
        self.length = t + 1
        h = self._operand(_rms_norm(model.model.norm, x).t())  # (C, width)
        return _logits(self.head, self.head_bias, h, n)

    def _kernel_step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """`step` with the decoder layers in csrc/llama_step.c (one call per step)."""
        model = self.model
        n = token.shape[0]
        width = column_width(n)
        x, scratch = self._buffers(width)  # (C, width), scratch
        embedded = model.model.embed_tokens(token)  # (n, C)
        x[:, :n] = embedded.t()
        cos, sin = model.model.rotary_emb(embedded, position[None])  # (1, n, D)
        cos, sin = cos[0].t().contiguous(), sin[0].t().contiguous()  # (D, n)
        shape = self.shape
        shape.n, shape.width, shape.t = n, width, self.length
        shape.threads = torch.get_num_threads()
        kernels.library().llama_step(
            ctypes.byref(shape),
            x.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            self.alive.data_ptr(),
            self.first.data_ptr(),
            self.pointers,
            model.model.norm.weight.data_ptr(),
            scratch.data_ptr(),
        )
        self.length += 1
        return _logits(self.head, self.head_bias, x, n)

    def _buffers(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's residual stream (C, width) and scratch for `width` columns (reused)."""
        if width not in self.buffers:
            config, layer = self.model.config, self.layers[0]
            hidden, inner = config.hidden_size, layer.mlp.down_proj.in_features
            qkv = (self.heads + 2 * self.kv_heads) * self.head_dim
            rows = hidden + qkv + self.heads * self.head_dim + hidden + 3 * inner
            zeros = self.own_keys[0].new_zeros
            self.buffers[width] = (zeros(hidden, width), zeros(rows, width))
        return self.buffers[width]

    def _operand(self, xt: torch.Tensor) -> torch.Tensor:
        """xt (K, n) as a contiguous (K, width) GEMM operand in the GEMM dtype, width = n rounded
        up to a multiple of COLUMN_BLOCK: what `grpo.kernels.skinny_gemm` takes, and what MKL
        (its fallback) runs fastest. One reused buffer per shape; what the padding columns hold
        never matters (columns of W @ x do not mix)."""
        K, n = xt.shape
        width = column_width(n)
        if width == n and xt.is_contiguous() and xt.dtype == self.dtype:
            return xt
        buffer = self.operands.get((K, width))
        if buffer is None:  # (K, width)
            buffer = self.operands[(K, width)] = xt.new_zeros(K, width, dtype=self.dtype)
        buffer[:, :n] = xt
        return buffer

    def _attention(self, i: int, q: torch.Tensor, scaling: float, own: int) -> torch.Tensor:
        """Attention of live rows' queries (n, H, D) over [prompt KV, first `own` own KV]."""
        B, G, N, Hkv = self.B, self.G, self.N, self.kv_heads
        n, H, D = q.shape
        rep = H // Hkv
        full = n == N
        q = q.reshape(n, Hkv, rep, D) * scaling
        grid = q if full else q.new_zeros(N, Hkv, rep, D).index_copy_(0, self.alive, q)
        grouped = grid.view(B, G, Hkv, rep, D).transpose(1, 2).reshape(B, Hkv, G * rep, D)
        pre = torch.matmul(grouped, self.prefix_keys[i].transpose(-1, -2))  # (B, Hkv, G·rep, P)
        pre = pre + self.prefix_bias
        P = pre.shape[-1]
        pre = pre.view(B, Hkv, G, rep, P).transpose(1, 2).reshape(N, Hkv, rep, P)
        if not full:
            pre = pre[self.alive]  # (n, Hkv, rep, P)
        keys = self.own_keys[i][:, :, :own]  # (n, Hkv, s, D)
        mine = torch.matmul(q, keys.transpose(-1, -2))  # (n, Hkv, rep, s)
        probs = torch.softmax(torch.cat([pre, mine], dim=-1), dim=-1)  # (n, Hkv, rep, P + s)
        p_pre, p_own = probs[..., :P], probs[..., P:]
        if not full:
            p_pre = p_pre.new_zeros(N, Hkv, rep, P).index_copy_(0, self.alive, p_pre)
        p_pre = p_pre.reshape(B, G, Hkv, rep, P).transpose(1, 2).reshape(B, Hkv, G * rep, P)
        out = torch.matmul(p_pre, self.prefix_values[i])  # (B, Hkv, G·rep, D)
        out = out.view(B, Hkv, G, rep, D).transpose(1, 2).reshape(N, Hkv, rep, D)
        if not full:
            out = out[self.alive]  # (n, Hkv, rep, D)
        out = out + torch.matmul(p_own, self.own_values[i][:, :, :own])  # (n, Hkv, rep, D)
        return out.reshape(n, H, D)
