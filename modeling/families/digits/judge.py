"""`DigitJudge`: reads a scene slot by slot (empty? which digit? faint?), the program behind
digits-GenEval, and the fixed (scene, prompt) feature space of digits-FID.

Brightness is read from the slot's peak (mean of its 5 brightest pixels, digit units): real
digits peak at >= 13.2, faint ones (x0.4) at <= 6.4, empty slots at 0. The digit is read by a
small MLP trained deterministically on the real *training* split, on peak-normalised images so
a faint digit reads like a bright one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .scenes import GenSpec, digit_split, to_digit_units

EMPTY_PEAK = 2.7  # below: empty (half the faintest real faint digit's peak)
FAINT_PEAK = 9.8  # below: faint (midway between 6.4 and 13.2)


@dataclass
class SlotReading:
    """Per scene and slot (N, 2): empty, digit (-1 where empty), faint, peak brightness."""

    empty: torch.Tensor
    digit: torch.Tensor
    faint: torch.Tensor
    peak: torch.Tensor


def _peak(slots: torch.Tensor) -> torch.Tensor:
    """slots (N, 8, 8) digit units -> (N,) mean of the 5 brightest pixels."""
    return slots.flatten(1).topk(5, dim=1).values.mean(1)


def _normalise(slots: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) digit units -> (N, 64) in [0, 1], scaled so the peak reads 16."""
    scale = 16.0 / _peak(slots).clamp(min=1e-3)
    return (slots.flatten(1) * scale[:, None]).clamp(0, 16) / 16.0


class DigitJudge:
    """Deterministic digit reader; `DigitJudge.get()` returns the process-wide cached instance."""

    def __init__(self, seed: int = 0, epochs: int = 200):
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 10))
        torch.random.set_rng_state(torch_state)
        x, y = self._tensors("train")
        images = x.view(-1, 8, 8)  # one-pixel shifts: generated digits are not always centred
        shifts = [(0, 0), (0, 1), (0, -1), (1, 0), (-1, 0)]
        x = torch.cat([torch.roll(images, s, dims=(1, 2)) for s in shifts]).view(-1, 64)
        y = y.repeat(len(shifts))
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(self.net.parameters(), lr=3e-3, weight_decay=1e-4)
        with torch.enable_grad():  # may be built inside an evaluation's no_grad
            for _ in range(epochs):  # full batch; pixel noise makes it robust to generated pixels
                noisy = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
                loss = nn.functional.cross_entropy(self.net(noisy), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.net.eval().requires_grad_(False)

    @staticmethod
    @functools.cache
    def get() -> DigitJudge:
        return DigitJudge()

    @staticmethod
    def _tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = digit_split()[split]
        return _normalise(torch.from_numpy(images)), torch.from_numpy(labels)

    def heldout_accuracy(self) -> float:
        """Accuracy on the real held-out digits (the judge must be right before it judges)."""
        x, y = self._tensors("heldout")
        return float((self.net(x).argmax(-1) == y).float().mean())

    def classify(self, slots: torch.Tensor) -> torch.Tensor:
        """slots (N, 8, 8) digit units -> (N,) digit predictions (brightness-invariant)."""
        return self.net(_normalise(slots.float().cpu())).argmax(-1)

    @staticmethod
    def _slots(canvas: torch.Tensor) -> torch.Tensor:
        """canvas (N, 8, 16) model units -> (N, 2, 8, 8) digit units."""
        c = to_digit_units(canvas.detach().float().cpu())
        return torch.stack([c[:, :, :8], c[:, :, 8:]], dim=1)

    def read(self, canvas: torch.Tensor) -> SlotReading:
        """canvas (N, 8, 16) in model units [-1, 1] -> a reading of both slots."""
        slots = self._slots(canvas)  # (N, 2, 8, 8)
        N = slots.shape[0]
        peak = _peak(slots.reshape(-1, 8, 8)).reshape(N, 2)
        digit = self.classify(slots.reshape(-1, 8, 8)).reshape(N, 2)
        empty = peak < EMPTY_PEAK
        return SlotReading(empty=empty, digit=torch.where(empty, -1, digit), faint=~empty & (peak < FAINT_PEAK), peak=peak)

    def fid_features(self, specs: list[GenSpec], canvas: torch.Tensor) -> np.ndarray:
        """digits-FID's joint (scene, prompt) features -> (N, 46), for a Fréchet *joint* distance.

        A plain FID only compares the marginal distribution of scenes: a model that draws a
        realistic seven when asked for a two scores as well as one that obeys. Pairing each scene
        with its prompt (FJD, DeVries et al. 2019, "On the evaluation of conditional GANs") makes
        the distance see prompt-following as well as realism and diversity. Per slot:
        10 x [the judge's class probabilities x brightness (10), brightness (1)] for the scene and
        10 x [one-hot digit (10), faint (1), empty (1)] for what the prompt asks there. Where a
        prompt leaves the side open, the brighter slot is put first (in both sets alike).
        """
        slots = self._slots(canvas)  # (N, 2, 8, 8)
        N = slots.shape[0]
        flat = slots.reshape(-1, 8, 8)
        bright = (_peak(flat) / 16.0).clamp(max=1.0).reshape(N, 2)  # (N, 2)
        probs = self.net(_normalise(flat)).softmax(-1).reshape(N, 2, 10) * bright[..., None]
        scene = torch.cat([probs, bright[..., None]], dim=-1)  # (N, 2, 11)
        prompt = torch.zeros(N, 2, 12)
        for i, spec in enumerate(specs):
            asked = [0, 1] if len(spec.digits) == 2 else [1 if spec.side == "right" else 0]
            if spec.side is None and len(spec.digits) == 1 and bright[i, 1] > bright[i, 0]:
                scene[i] = scene[i].flip(0)  # open side: brighter slot first
            for s in (0, 1):
                if s in asked:
                    k = asked.index(s)
                    prompt[i, s, spec.digits[k]], prompt[i, s, 10] = 1.0, float(spec.faint[k])
                else:
                    prompt[i, s, 11] = 1.0
        return 10.0 * torch.cat([scene.reshape(N, 22), prompt.reshape(N, 24)], dim=1).numpy().astype(np.float64)

    def satisfies(self, specs: list[GenSpec], canvas: torch.Tensor) -> torch.Tensor:
        """Does scene i (canvas (N, 8, 16)) do what specs[i] asked? GenEval's per-category rules -> (N,) bool.

        two/counting/color_attr: left and right slots hold the named digits (color_attr: and the
        named brightness); single/colors/position: exactly one slot drawn, holding the digit
        (colors: with the named brightness; position: in the named slot).
        """
        r = self.read(canvas)
        return torch.tensor([_satisfies(s, r.digit[i].tolist(), r.faint[i].tolist()) for i, s in enumerate(specs)])


def _satisfies(spec: GenSpec, digit: list[int], faint: list[bool]) -> bool:
    if len(spec.digits) == 2:
        ok = digit[0] == spec.digits[0] and digit[1] == spec.digits[1]
        return ok and (spec.category != "color_attr" or (faint[0], faint[1]) == spec.faint)
    drawn = [s for s in (0, 1) if digit[s] >= 0]
    if len(drawn) != 1 or digit[drawn[0]] != spec.digits[0]:
        return False
    if spec.category == "colors" and faint[drawn[0]] != spec.faint[0]:
        return False
    return spec.category != "position" or drawn[0] == (0 if spec.side == "left" else 1)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, F) and b (M, F).

    d = |mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^1/2), with the last trace taken as
    sum sqrt(eig(C_a^1/2 C_b C_a^1/2)): symmetric, so it stays real and stable when a covariance
    from few samples is singular.
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(w.clip(min=0))) @ v.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clip(min=0)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(cross).sum())
