"""
The head of GPT-2 where a log-prob is needed, and nowhere else: log p(y) of chosen tokens from the
final hidden states, in fp32, through the tied head in chunks of rows. At GPT-2's 50257 outputs the
logits of a whole batch, (B, T, V) in fp32, are gigabytes; here one chunk of them exists at a time,
plus, when a gradient is wanted, the softmax of at most KEEP_LOGITS of them for backward (the other
chunks' logits are recomputed there). model.token_logprobs selects the positions and calls it; it
lives here so that model.py stays short. Forward and backward each loop over the chunks inside one
call and write into preallocated outputs: one autograd call per chunk, or one kept tensor per chunk,
left small tensors between freed chunks and grew the CPU heap (peak RSS 2.4 GiB where 1.5 were
live, measured at bench.py's RL shape).
"""

import torch

# fp32 logits per chunk (32 MiB): the fastest size on CPU of those we tried (measured)
CHUNK_LOGITS = 2**23
# with grad, softmax values kept for backward, at most (1 GiB): recomputed beyond
KEEP_LOGITS = 2**28


class TargetLogprobs(torch.autograd.Function):
    """log p(y) = z_y - logsumexp(z) in fp32, z = h W^T / temperature, for rows h (N, C) of final
    hidden states and the tied head W (V, C), CHUNK_LOGITS logits at a time; with entropy also the
    policy's entropy H = logsumexp(z) - sum_v p_v z_v. Backward needs softmax(z):
    d log p(y) / dz = onehot(y) - softmax(z). When h needs a gradient, forward keeps the softmax of
    the first rows in one buffer of at most KEEP_LOGITS values, and backward recomputes the other
    rows' logits (under CUDA autocast in the forward's precision); otherwise (pi_ref, pi_old,
    evaluation) no chunk outlives its turn."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, h, weight, y, temperature, entropy):
        V = weight.size(0)
        rows = max(1, CHUNK_LOGITS // V)
        n_kept = min(len(y), KEEP_LOGITS // V // rows * rows) if ctx.needs_input_grad[0] else 0
        ctx.base, kept = keep_buffer(n_kept, V, h.device)
        lp, lse = torch.empty(len(y), device=h.device), torch.empty(len(y), device=h.device)
        ent = torch.empty(len(y) if entropy else 0, device=h.device)
        for s in (slice(i, min(i + rows, len(y))) for i in range(0, len(y), rows)):
            z = logits_chunk(h[s], weight, temperature)
            top = z.amax(-1, keepdim=True)
            e = torch.sub(z, top, out=kept[s]) if s.stop <= len(kept) else z - top
            total = e.exp_().sum(-1)  # e = softmax(z) * total: one exp for logsumexp and entropy
            lse[s] = top.squeeze(1) + total.log()
            lp[s] = z.gather(1, y[s, None]).squeeze(1) - lse[s]
            if entropy:
                ent[s] = lse[s] - (e * z).sum(-1) / total
            if s.stop <= len(kept):
                e.div_(total[:, None])
        ctx.save_for_backward(h, weight, y, lse)
        ctx.temperature, ctx.rows, ctx.kept = temperature, rows, kept
        ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad, _):
        h, weight, y, lse = ctx.saved_tensors
        grad_h, grad_w, g = torch.empty_like(h), torch.zeros_like(weight), grad / ctx.temperature
        for s in (slice(i, min(i + ctx.rows, len(y))) for i in range(0, len(y), ctx.rows)):
            if s.stop <= len(ctx.kept):
                p = ctx.kept[s]
            else:
                p = logits_chunk(h[s], weight, ctx.temperature).sub_(lse[s, None]).exp_()
            # g (onehot(y) - p)
            dz = p.mul_(-g[s, None]).scatter_add_(1, y[s, None], g[s, None]).to(h.dtype)
            grad_h[s] = dz @ weight
            grad_w.addmm_(dz.t(), h[s])
        # spoilt in place: the next forward may reuse it; a second backward recomputes
        SPARE[:] = [max(SPARE + [ctx.base], key=torch.numel)]
        ctx.kept = ctx.base = ctx.kept.new_empty(0)
        return grad_h, grad_w, None, None, None


SPARE = []  # the largest keep buffer whose backward has run: fresh pages cost ~0.3 s per GiB on CPU


def keep_buffer(n, V, device):
    """(base, an (n, V) view of it) for the kept softmax: one allocation (chunk-sized ones would
    fragment the CPU heap), or the spare one when it is big enough. A buffer is only reused after
    its own backward, so two forwards in flight never share one."""
    if n and SPARE and SPARE[0].device == device and SPARE[0].numel() >= n * V:
        base = SPARE.pop()
        return base, base[: n * V].view(n, V)
    base = torch.empty(n * V, device=device)
    return base, base.view(n, V)


def logits_chunk(h, weight, temperature):
    """The (n, V) logits of n rows in fp32, divided by the temperature in place."""
    z = (h @ weight.t()).float()
    return z.div_(temperature) if temperature != 1 else z
