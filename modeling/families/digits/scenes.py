"""Two-slot digit scenes, the understanding questions and the GenEval-style prompts.

A scene is an 8x16 canvas: a left and a right 8x8 slot, each empty or a real `load_digits`
image, drawn normally or faint (grey levels x `FAINT_SCALE`). Pixel values live in [0, 16]
("digit units") for the judge and in [-1, 1] ("model units", `to_model_units`) for the model.
Scenes are compositional on purpose: a single-digit, class-only task saturates even with 2
sampling steps, two slots with attributes leave headroom for the metrics.

Everything random draws from an explicit `torch.Generator`, so a seed fixes a batch exactly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .vocab import DIGIT_WORDS, PLURAL_WORDS, TOKENIZER

FAINT_SCALE = 0.4
P_EMPTY = 0.3  # chance that a slot is empty in a free scene
P_FAINT = 0.3  # chance that a present digit is faint in a free scene
QUESTION_TYPES = ("left", "right", "which", "count", "faint", "sum")
GEN_CATEGORIES = ("single", "two", "counting", "colors", "position", "color_attr")
QUESTION_LEN = 7  # longest question in words ("is the sum greater than ten ?")
ANSWER_LEN = 3  # longest answer in words + <eos> ("seven two <eos>")
PROMPT_LEN = 8  # longest prompt in words ("draw a faint seven and a bright two")


@functools.lru_cache(maxsize=1)
def digit_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The fixed stratified 80/20 split of `load_digits`: {"train"|"heldout": (images, labels)}.

    images (N, 8, 8) float32 in [0, 16]; labels (N,) int64. Held-out images are for evaluation only.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.images.astype(np.float32), data.target.astype(np.int64),
        test_size=0.2, stratify=data.target, random_state=0,
    )  # fmt: skip
    return {"train": (x_tr, y_tr), "heldout": (x_te, y_te)}


@functools.lru_cache(maxsize=2)
def _class_index(split: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    images, labels = digit_split()[split]
    return torch.from_numpy(images), [torch.from_numpy(np.flatnonzero(labels == k)) for k in range(10)]


@dataclass(frozen=True)
class Slot:
    """One slot of a scene: `digit` None means empty."""

    digit: int | None = None
    faint: bool = False


@dataclass(frozen=True)
class Scene:
    left: Slot
    right: Slot

    @property
    def slots(self) -> tuple[Slot, Slot]:
        return (self.left, self.right)


def _randint(g: torch.Generator, n: int) -> int:
    return int(torch.randint(n, (1,), generator=g))


def _coin(g: torch.Generator, p: float) -> bool:
    return bool(torch.rand((), generator=g) < p)


def render(scene: Scene, g: torch.Generator, split: str, shift: bool = False) -> torch.Tensor:
    """Draws a real image of each slot's digit from `split`: canvas (8, 16) in digit units.

    `shift` moves each digit by up to one pixel (zero fill), an understanding-side augmentation:
    without it the understanding path memorises the 1,437 training images.
    """
    images, by_class = _class_index(split)
    canvas = torch.zeros(8, 16)
    for s, slot in enumerate(scene.slots):
        if slot.digit is not None:
            pool = by_class[slot.digit]
            img = images[pool[_randint(g, len(pool))]] * (FAINT_SCALE if slot.faint else 1.0)  # (8, 8)
            if shift:
                img = _shifted(img, _randint(g, 3) - 1, _randint(g, 3) - 1)
            canvas[:, 8 * s : 8 * s + 8] = img
    return canvas


def _shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    out = torch.zeros_like(img)
    out[max(dy, 0) : 8 + min(dy, 0), max(dx, 0) : 8 + min(dx, 0)] = img[max(-dy, 0) : 8 + min(-dy, 0), max(-dx, 0) : 8 + min(-dx, 0)]
    return out


def to_model_units(canvas: torch.Tensor) -> torch.Tensor:
    """[0, 16] -> [-1, 1]."""
    return canvas / 8.0 - 1.0


def to_digit_units(canvas: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 16], clamped (generated values may overshoot)."""
    return ((canvas.clamp(-1.0, 1.0) + 1.0) * 8.0).clamp(0.0, 16.0)


# ---------------------------------------------------------------- understanding


def _free_slot(g: torch.Generator) -> Slot:
    if _coin(g, P_EMPTY):
        return Slot()
    return Slot(_randint(g, 10), _coin(g, P_FAINT))


def _present_slot(g: torch.Generator, faint: bool | None = None) -> Slot:
    return Slot(_randint(g, 10), _coin(g, P_FAINT) if faint is None else faint)


def sample_question(qtype: str, g: torch.Generator) -> tuple[Scene, str, str]:
    """A scene made for question type `qtype`, the question and its answer (both as words).

    `faint` is only asked about a slot that holds a digit, `sum` only of two digits with the
    yes/no answer balanced, so that each type's chance level stays low and its meaning clear.
    """
    if qtype in ("left", "right", "which", "count"):
        scene = Scene(_free_slot(g), _free_slot(g))
        names = [DIGIT_WORDS[s.digit] for s in scene.slots if s.digit is not None]
        if qtype in ("left", "right"):
            slot = scene.left if qtype == "left" else scene.right
            return scene, f"what is on the {qtype} ?", DIGIT_WORDS[slot.digit] if slot.digit is not None else "nothing"
        if qtype == "which":
            return scene, "which digits are shown ?", " ".join(names) or "nothing"
        return scene, "how many digits are shown ?", DIGIT_WORDS[len(names)]
    if qtype == "faint":
        side, faint = ("left", "right")[_randint(g, 2)], _coin(g, 0.5)
        asked, other = _present_slot(g, faint), _free_slot(g)
        scene = Scene(asked, other) if side == "left" else Scene(other, asked)
        return scene, f"is the {side} digit faint ?", "yes" if faint else "no"
    if qtype == "sum":
        want = _coin(g, 0.5)
        while True:
            a, b = _present_slot(g), _present_slot(g)
            if (a.digit + b.digit > 10) == want:
                return Scene(a, b), "is the sum greater than ten ?", "yes" if want else "no"
    raise ValueError(f"question type must be one of {QUESTION_TYPES}, got {qtype!r}")


def ask(qtype: str, scene: Scene, g: torch.Generator) -> tuple[str, str] | None:
    """A question of `qtype` about a given scene and its answer; None where it does not apply
    (`faint` needs a digit on the asked side, `sum` two digits). Used for follow-up turns."""
    names = [DIGIT_WORDS[s.digit] for s in scene.slots if s.digit is not None]
    if qtype in ("left", "right"):
        slot = scene.left if qtype == "left" else scene.right
        return f"what is on the {qtype} ?", DIGIT_WORDS[slot.digit] if slot.digit is not None else "nothing"
    if qtype == "which":
        return "which digits are shown ?", " ".join(names) or "nothing"
    if qtype == "count":
        return "how many digits are shown ?", DIGIT_WORDS[len(names)]
    if qtype == "faint":
        sides = [side for side, slot in zip(("left", "right"), scene.slots) if slot.digit is not None]
        if not sides:
            return None
        side = sides[_randint(g, len(sides))]
        return f"is the {side} digit faint ?", "yes" if getattr(scene, side).faint else "no"
    if qtype == "sum":
        if scene.left.digit is None or scene.right.digit is None:
            return None
        return "is the sum greater than ten ?", "yes" if scene.left.digit + scene.right.digit > 10 else "no"
    raise ValueError(f"question type must be one of {QUESTION_TYPES}, got {qtype!r}")


def encode_question(question: str) -> list[int]:
    """Left-padded to QUESTION_LEN, so every answer starts at the same position."""
    ids = TOKENIZER.encode(question)
    assert len(ids) <= QUESTION_LEN, question
    return [TOKENIZER.pad_id] * (QUESTION_LEN - len(ids)) + ids


def encode_answer(answer: str) -> list[int]:
    """Answer words + <eos>, right-padded to ANSWER_LEN."""
    ids = TOKENIZER.encode(answer) + [TOKENIZER.eos_id]
    assert len(ids) <= ANSWER_LEN, answer
    return ids + [TOKENIZER.pad_id] * (ANSWER_LEN - len(ids))


# ---------------------------------------------------------------- generation


@dataclass(frozen=True)
class GenSpec:
    """What a prompt asks for; `side` is None where the prompt leaves the position open."""

    category: str
    prompt: str
    digits: tuple[int, ...]
    faint: tuple[bool, ...]
    side: str | None = None

    def scene(self, g: torch.Generator) -> Scene:
        """A scene that satisfies the prompt (the free position is drawn at random)."""
        if len(self.digits) == 2:
            return Scene(Slot(self.digits[0], self.faint[0]), Slot(self.digits[1], self.faint[1]))
        side = self.side or ("left", "right")[_randint(g, 2)]
        slot = Slot(self.digits[0], self.faint[0])
        return Scene(slot, Slot()) if side == "left" else Scene(Slot(), slot)


def sample_prompt(category: str, g: torch.Generator) -> GenSpec:
    """A GenEval-style prompt of `category`; two-digit prompts name left then right."""
    a = _randint(g, 10)
    b = (a + 1 + _randint(g, 9)) % 10  # a different digit
    name_a, name_b = DIGIT_WORDS[a], DIGIT_WORDS[b]
    if category == "single":
        return GenSpec(category, f"draw {name_a}", (a,), (False,))
    if category == "two":
        return GenSpec(category, f"draw {name_a} and {name_b}", (a, b), (False, False))
    if category == "counting":
        return GenSpec(category, f"draw two {PLURAL_WORDS[a]}", (a, a), (False, False))
    if category == "colors":
        faint = _coin(g, 0.5)
        return GenSpec(category, f"draw a {'faint' if faint else 'bright'} {name_a}", (a,), (faint,))
    if category == "position":
        side = ("left", "right")[_randint(g, 2)]
        return GenSpec(category, f"draw {name_a} on the {side}", (a,), (False,), side)
    if category == "color_attr":
        fa, fb = _coin(g, 0.5), _coin(g, 0.5)
        attr = lambda f: "faint" if f else "bright"  # noqa: E731
        return GenSpec(category, f"draw a {attr(fa)} {name_a} and a {attr(fb)} {name_b}", (a, b), (fa, fb))
    raise ValueError(f"generation category must be one of {GEN_CATEGORIES}, got {category!r}")


def encode_prompt(prompt: str | None) -> list[int]:
    """Left-padded to PROMPT_LEN so the image tokens always sit at the same positions; None = null prompt."""
    ids = [TOKENIZER.null_id] if prompt is None else TOKENIZER.encode(prompt)
    assert len(ids) <= PROMPT_LEN, prompt
    return [TOKENIZER.pad_id] * (PROMPT_LEN - len(ids)) + ids


# ---------------------------------------------------------------- batches


def make_und_batch(
    qtypes: list[str], g: torch.Generator, split: str, turns: int = 1, augment: bool = False
) -> tuple[dict[str, torch.Tensor], list]:
    """Understanding samples, one per entry of `qtypes`; returns (tensors, [(scene, q, a)]).

    With `turns` > 1 a sample holds 1..turns question/answer turns about its scene (the first of
    type qtypes[i], the rest distinct random questions), right-padded: more supervision per image forward, and the
    first turn is exactly a single-question sample. `augment` shifts digits (see `render`).
    """
    images, input_ids, labels, meta = [], [], [], []
    for qtype in qtypes:
        scene, question, answer = sample_question(qtype, g)
        qa = [(question, answer)]
        extra_turns = _randint(g, turns) if turns > 1 else 0
        for _ in range(50 * extra_turns):  # distinct follow-up questions that apply to the scene
            if len(qa) > extra_turns:
                break
            extra = ask(QUESTION_TYPES[_randint(g, len(QUESTION_TYPES))], scene, g)
            if extra is not None and extra[0] not in (q for q, _ in qa):
                qa.append(extra)
        ids, lab = [], []
        for q_words, a_words in qa:
            q, a = encode_question(q_words), encode_answer(a_words)
            ids += q + a
            lab += [-100] * len(q) + [i if i != TOKENIZER.pad_id else -100 for i in a]
        pad = turns * (QUESTION_LEN + ANSWER_LEN) - len(ids)
        images.append(to_model_units(render(scene, g, split, shift=augment)))
        input_ids.append(ids + [TOKENIZER.pad_id] * pad)
        labels.append(lab + [-100] * pad)
        meta.append((scene, question, answer))
    batch = {
        "und_images": torch.stack(images),  # (B, 8, 16) in [-1, 1]
        "und_input_ids": torch.tensor(input_ids),  # (B, turns * (QUESTION_LEN + ANSWER_LEN))
        "und_labels": torch.tensor(labels),  # -100 outside the answers
    }
    return batch, meta


def make_gen_batch(specs: list[GenSpec], g: torch.Generator, split: str, cfg_dropout: float) -> dict[str, torch.Tensor]:
    """Generation samples: prompt ids, the clean target x0, the noise and the flow time t."""
    images, prompts = [], []
    for spec in specs:
        images.append(to_model_units(render(spec.scene(g), g, split)))
        prompts.append(encode_prompt(None if _coin(g, cfg_dropout) else spec.prompt))
    x0 = torch.stack(images)  # (B, 8, 16)
    return {
        "gen_prompt_ids": torch.tensor(prompts),  # (B, PROMPT_LEN), left-padded
        "gen_images": x0,
        "gen_noise": torch.randn(x0.shape, generator=g),  # (B, 8, 16)
        "gen_t": torch.rand(len(specs), generator=g),  # (B,) uniform flow time
    }


UND_FRACTION = 0.5  # share of a batch that is understanding samples
UND_TURNS = 1  # question/answer turns per training scene (at most); see NOTES.md before raising it


def make_batch(
    batch_size: int,
    generator: torch.Generator,
    split: str = "train",
    cfg_dropout: float = 0.1,
    und_fraction: float = UND_FRACTION,
    und_turns: int = UND_TURNS,
    augment: bool = False,
) -> dict[str, torch.Tensor]:
    """A training batch with both tasks (`und_fraction` understanding, the rest generation) for
    `model(**batch)`.

    Question types and prompt categories are drawn uniformly, so every type appears in a batch
    of a few dozen. Understanding scenes may carry up to `und_turns` questions and, with
    `augment`, shifted digits; generation targets are never augmented (they are what FID
    compares with). The defaults are the recipe NOTES.md measured.
    """
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (one sample per task), got {batch_size}")
    n_und = min(batch_size - 1, max(1, round(und_fraction * batch_size)))
    qtypes = [QUESTION_TYPES[_randint(generator, len(QUESTION_TYPES))] for _ in range(n_und)]
    cats = [GEN_CATEGORIES[_randint(generator, len(GEN_CATEGORIES))] for _ in range(batch_size - n_und)]
    und, _ = make_und_batch(qtypes, generator, split, turns=und_turns, augment=augment)
    gen = make_gen_batch([sample_prompt(c, generator) for c in cats], generator, split, cfg_dropout)
    return {**und, **gen}
