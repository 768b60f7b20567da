"""The fused sampler step bound to one sampling loop (:class:`LoopStep`): what is fixed for the loop is validated
once, when it is bound; each call checks only what a model can change. :meth:`LoopStep.fresh` serves callers that
own only the table and seed (the diffusers schedulers' ``step()``): it tests every tensor passed, cheaply, and sends
what it cannot clear to the front-end.

The checked front-end :func:`diffkern.ops.sampler_step` validates every argument on every call. Measured (medians,
(4, 3, 8, 8) float32, torch with one thread on the shared 2-core CI CPU, /tmp/hostcost*.py of the change): per call
its checks took ~18 us against ~3 us for the cpp launch, :meth:`LoopStep.step` ~2.5 us; per step of a 50-step loop
with the model ``x*0.5`` (checked front-end vs LoopStep, interleaved runs), cpp euler 56 -> 32 us, euler_ancestral
53 -> 29 us, dpmpp_2m 62 -> 29 us, and on the reference backend, whose rows with s = 0 now skip the Philox draw,
euler 1007 -> 82 us and dpmpp_2m 1035 -> 99 us (euler_ancestral draws on every row but the last: 997 -> 933 us).
On a GPU that host time, not the kernel, would bound eager sampling of small models.

Kept on every call, with the front-end's messages: the model output(s) (a tensor of a floating dtype, x's shape and
device; the unconditional output of the conditional one's dtype; a non-contiguous one made contiguous, as the
front-end does, since a model may return another layout or dtype on a later call) and explicit noise (a
noise_sampler's: x's dtype too), that they overlap no output (the front-end's overlap check, run in full whenever
they share memory with a buffer the loop writes), the row index, and that the histories the row reads are given
(from the host table). The launch is the registry's own, resolved once (the ``torch.ops.diffkern`` op for cpp,
cuda and triton; the reference, told on the host which rows draw no noise, so it skips their Philox draw).
"""
from __future__ import annotations

import torch

from . import _checks, coefs
from .registry import resolve
from .sampler_step import _launch_reference, check_coef, check_histories, sampler_step


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[lo, hi) bytes ``t`` can reach."""
    if t.is_contiguous():
        lo = t.data_ptr()
        return lo, lo + t.numel() * t.element_size()
    return _checks._span(t)


class LoopStep:
    """``diffkern.ops.sampler_step`` for one sampling loop's buffers, validated once.

    x: the loop's state, (B, ...) floating, contiguous. table: the loop's (N, NCOEF) float64 coefficient table on x's
    device, contiguous, made outside ``torch.inference_mode`` (its version counter tells an in-place rewrite).
    host_table: its CPU float64 copy (the plan's), read here to know which rows need histories and draw noise (so
    the reference skips the draw of a row whose s is 0); after an in-place rewrite of ``table`` a CPU table is
    re-read, a device one is not (the rows then all draw, their histories unchecked, as the front-end has them).
    None when the launches will be replayed on tables fed later (a CUDA graph's): no launch may then depend on the
    values (every row draws; a CPU table's histories are still checked, as the front-end checks them).
    seed: int64 (1,) or (B,) on x's device. histories: the loop's history buffers (x's shape, dtype and device,
    contiguous). x0_buffer: None or (steps, *x.shape) whose rows the loop passes as ``x0_out`` (a trajectory).
    backend: as the front-end's; resolved here (an ``auto`` fallback warns here, once).

    Contract: every ``history_out`` and ``x0_out`` a call passes is a history, a row of ``x0_buffer``, or a tensor
    like x allocated after the model call; every history passed is one of ``histories``; ``x`` and ``out`` are
    contiguous tensors like x (any: the model outputs are checked against them at each call).
    """

    def __init__(self, x, table, host_table, seed, *, histories=(), x0_buffer=None, backend=None, stacklevel=3):
        _checks.float_tensor(x, "x")
        if not x.is_contiguous():
            raise ValueError("x: expected a contiguous tensor (the loop's own state)")
        check_coef(table, x)
        if not table.is_contiguous() or table.is_inference():
            raise ValueError("coef: expected a contiguous table made outside torch.inference_mode")
        if host_table is not None and (not isinstance(host_table, torch.Tensor) or host_table.device.type != "cpu"
                                       or host_table.shape != table.shape):
            raise ValueError(f"host_table: expected None or the CPU copy of coef, of shape {tuple(table.shape)}")
        self.seed = _checks.seed_tensor(seed, x)
        shared = {"coef": table, "seed": self.seed}
        for h in histories:
            _checks.like(h, "history", x, "x")
            if not h.is_contiguous():
                raise ValueError("history: expected a contiguous buffer (the loop's own)")
            _checks.no_partial_overlap({"history_out": h}, {}, shared)
        if x0_buffer is not None:  # its rows are the x0_out of the steps
            _checks.tensor(x0_buffer, "x0_out")
            _checks.like(x0_buffer[0] if x0_buffer.dim() and len(x0_buffer) else x0_buffer, "x0_out", x, "x")
            _checks.no_partial_overlap({"x0_out": x0_buffer},
                                       {"x": x, **{f"history buffer {i}": h for i, h in enumerate(histories)}}, shared)
        _checks.no_partial_overlap({"out": x}, {}, shared)
        self.table, self.rows, self.shape, self.device, self.dtype = table, table.shape[0], x.shape, x.device, x.dtype
        # where a model output would share memory with a buffer the loop writes (bytes [lo, hi))
        self._spans = [_extent(t) for t in (x, *histories) + (() if x0_buffer is None else (x0_buffer,))]
        self._cuda, self._fixed = x.device.type == "cuda", host_table is not None
        self._read_rows(table if host_table is None else host_table)
        self.backend, launch = resolve("sampler_step", x.device.type, backend, stacklevel=stacklevel)
        self._launch = self._reference if self.backend == "reference" else launch

    def _read_rows(self, values: torch.Tensor) -> None:
        """Per row, from a table in host memory (validated once per version; reading a CUDA one would be a sync):
        the histories it reads (None: unchecked) and, for a fixed table, whether it draws noise (None: all do)."""
        host = values.device.type == "cpu"
        self._uses = coefs.validate_once(values) if host else None
        self._draws = (values[:, coefs.S] != 0).tolist() if host and self._fixed else None
        self._version = self.table._version

    def _reference(self, x, m, u, h, noise, coef, row, seed, out, x0_out, h_out, h2, h3):
        # belt and braces: a CUDA capture is replayed on whatever table is fed then, so it must draw on every row
        skip = self._draws is not None and not self._draws[row] and not (
            self._cuda and torch.cuda.is_current_stream_capturing())
        _launch_reference(x, m, u, h, noise, coef, row, seed, out, x0_out, h_out, h2, h3, skip_noise=skip)

    def _may_alias(self, t: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> bool:
        # x and out of the call too: after a callback's ping-pong they are a state allocated after an earlier model
        # call, which the spans bound at begin do not cover (a corrector step writes into it in place)
        lo, hi = _extent(t)
        for blo, bhi in (*self._spans, _extent(x), _extent(out)):
            if lo < bhi and blo < hi:
                return True
        return False

    def step(self, x, model_out, row: int, *, model_out_uncond=None, history=None, history2=None, history3=None,
             noise=None, out, x0_out=None, history_out=None) -> None:
        """One fused update on a model's output(s) and optional explicit noise (checked as the front-end checks
        them); arguments as :func:`diffkern.ops.sampler_step`'s, ``out`` required."""
        m, u = model_out, model_out_uncond
        if not (isinstance(m, torch.Tensor) and m.dtype in _checks.FLOAT_DTYPES and m.device == self.device
                and m.shape == self.shape):
            _checks.like(m, "model_out", x, "x", dtype=False)
        if u is not None and not (isinstance(u, torch.Tensor) and u.dtype == m.dtype and u.device == self.device
                                  and u.shape == self.shape):
            _checks.like(u, "model_out_uncond", m, "model_out")
        if noise is not None and not (isinstance(noise, torch.Tensor) and noise.dtype == x.dtype
                                      and noise.device == self.device and noise.shape == self.shape):
            _checks.like(noise, "noise", x, "x")
        for t in (m, u, noise):
            if t is not None and t is not x and self._may_alias(t, x, out):
                _checks.no_partial_overlap({"out": out, "x0_out": x0_out, "history_out": history_out},
                                           {"x": x, "model_out": m, "model_out_uncond": u, "history": history,
                                            "history2": history2, "history3": history3, "noise": noise},
                                           {"coef": self.table, "seed": self.seed})
                break
        m, u, noise = (t if t is None or t.is_contiguous() else t.contiguous() for t in (m, u, noise))
        self.launch(x, m, row, model_out_uncond=u, history=history, history2=history2, history3=history3,
                    noise=noise, out=out, x0_out=x0_out, history_out=history_out)

    def launch(self, x, model_out, row: int, *, model_out_uncond=None, history=None, history2=None, history3=None,
               noise=None, out, x0_out=None, history_out=None) -> None:
        """The launch alone, for inputs the loop owns (a churn row's ``model_out`` is x itself)."""
        if type(row) is not int or not 0 <= row < self.rows:
            row = _checks.step_index(row, self.table)
        if self.table._version != self._version:  # rewritten in place since: re-read where it is host memory
            self._read_rows(self.table)
        if self._uses is not None:
            check_histories(self._uses[row], row, history, history2, history3)
        x0 = x0_out if x0_out is None or x0_out.is_contiguous() else torch.empty_like(x)
        self._launch(x, model_out, model_out_uncond, history, noise, self.table, row, self.seed, out, x0, history_out,
                     history2, history3)
        if x0 is not x0_out:
            x0_out.copy_(x0)

    def draws(self, row: int) -> bool:
        """Whether ``row`` draws noise (its s slot is non-zero; True where the values are not read on the host)."""
        if type(row) is not int or not 0 <= row < self.rows:
            row = _checks.step_index(row, self.table)
        if self.table._version != self._version:
            self._read_rows(self.table)
        return self._draws is None or self._draws[row]

    def fresh(self, x, model_out, row: int, *, noise=None, history=None, history2=None, history3=None,
              history_out=None, x0: bool = True):
        """One update into new outputs, for a caller that owns none of the inputs (a diffusers scheduler's ``step()``:
        the user's sample and model output, its own history buffers, one of which it may pass as ``history_out``).
        Arguments as :func:`diffkern.ops.sampler_step`'s; ``x0``: whether to write the x0 estimate. Returns ``(out,
        x0_out or None)``, new contiguous tensors like x.

        Per call this tests what the front-end checks, cheaply: x contiguous of the bound dtype, shape and device;
        the model output floating on x's device and shape; noise and histories contiguous like x; ``history_out``
        overlapping no input other than itself, nor the table or seed (``out`` and ``x0_out`` are new). A call they
        do not clear (another dtype or layout, a bad tensor, an overlap) runs the checked front-end on the same
        arguments, which handles or refuses it as it always has, with its messages. Measured (a Level-1 step's
        fused call, (1, 4, 16, 16) float32, cpp, one thread, shared 2-core CPU): ~33 us through the front-end,
        ~11 us here."""
        if self._clear(x, model_out, noise, history, history2, history3, history_out):
            out = torch.empty_like(x)
            x0_out = torch.empty_like(x) if x0 else None
            m = model_out if model_out.is_contiguous() else model_out.contiguous()
            self.launch(x, m, row, noise=noise, history=history, history2=history2, history3=history3, out=out,
                        x0_out=x0_out, history_out=history_out)
            return out, x0_out
        x0_out = torch.empty_like(x, memory_format=torch.contiguous_format) if x0 else None
        out = sampler_step(x, model_out, self.table, row, history=history, history2=history2, history3=history3,
                           history_out=history_out, noise=noise, seed=self.seed, x0_out=x0_out, backend=self.backend)
        return out, x0_out

    def _clear(self, x, m, *others) -> bool:
        """Whether :meth:`fresh` may launch without the front-end (``others``: noise, the histories, history_out)."""
        shape, device, dtype = self.shape, self.device, self.dtype
        if not (isinstance(x, torch.Tensor) and x.dtype == dtype and x.shape == shape and x.device == device
                and x.is_contiguous()):
            return False
        if not (isinstance(m, torch.Tensor) and m.dtype in _checks.FLOAT_DTYPES and m.shape == shape
                and m.device == device):
            return False
        for t in others:
            if t is not None and not (isinstance(t, torch.Tensor) and t.dtype == dtype and t.shape == shape
                                      and t.device == device and t.is_contiguous()):
                return False
        h_out = others[-1]
        if h_out is None:
            return True
        lo, hi = _extent(h_out)
        for t in (x, m, *others[:-1]):  # exact in-place use (the same tensor) is allowed, as the front-end allows it
            if t is not None and t is not h_out:
                tlo, thi = _extent(t)
                if lo < thi and tlo < hi:
                    return False
        return not any(lo < thi and tlo < hi for tlo, thi in (_extent(self.table), _extent(self.seed)))
