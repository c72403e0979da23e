"""The reference model's word vocabulary: one token per word, no subwords.

The task language is closed (a few question templates, GenEval-style prompts), so a word list
is the whole tokenizer. The list is stored in the model config, so a checkpoint carries the
vocabulary it was trained with.
"""

from __future__ import annotations

from collections.abc import Sequence

PAD, EOS, NULL = "<pad>", "<eos>", "<null>"
SPECIAL_TOKENS = [PAD, EOS, NULL]
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PLURAL_WORDS = ["zeros", "ones", "twos", "threes", "fours", "fives", "sixes", "sevens", "eights", "nines"]
OTHER_WORDS = [
    "nothing", "yes", "no", "?",
    "what", "is", "on", "the", "left", "right", "which", "digits", "are", "shown",
    "how", "many", "digit", "faint", "sum", "greater", "than", "ten",
    "draw", "a", "and", "bright",
]  # fmt: skip
WORDS = SPECIAL_TOKENS + DIGIT_WORDS + PLURAL_WORDS + OTHER_WORDS


class WordTokenizer:
    """Maps space-separated words to ids and back; `decode` stops at `<eos>` and drops `<pad>`."""

    def __init__(self, words: Sequence[str] = WORDS):
        self.words = list(words)
        self.ids = {w: i for i, w in enumerate(self.words)}
        assert len(self.ids) == len(self.words), "duplicate word in vocabulary"
        self.pad_id, self.eos_id, self.null_id = self.ids[PAD], self.ids[EOS], self.ids[NULL]

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.ids[w] for w in text.split()]
        except KeyError as err:
            raise ValueError(f"word {err.args[0]!r} is not in the reference vocabulary") from None

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i != self.pad_id:
                out.append(self.words[i])
        return " ".join(out)


TOKENIZER = WordTokenizer()
