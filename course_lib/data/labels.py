"""From a `Sample` to `input_ids` + `labels`: the plain template, the model's chat template, image tokens.

Two templates, as in LLaVA's two training stages:

* `plain` (stage 1, projector pretraining): `<image>` tokens + caption + eos, loss on caption + eos.
  LLaVA's `conv_llava_plain` / `preprocess_plain` (haotian-liu/LLaVA, llava/train/train.py) drops the
  human turn and ends the caption with the separator "\\n". We end it with the tokenizer's eos token
  instead: that is the token `generate` stops on, so a stage-1 model learns to stop after its caption.
  For Qwen2.5-Instruct (and the tiny tokenizer) eos is `<|im_end|>`, for base Qwen2.5 `<|endoftext|>`.
* `chat` (stage 2, instruction tuning): the tokenizer's own chat template (Qwen2.5's ChatML).
  Only the assistant answers carry loss, each with its closing `<|im_end|>` (so the model learns to end
  its turn). System and user turns, the `<|im_start|>assistant\\n` header, image tokens and the "\\n"
  after `<|im_end|>` are IGNORE_INDEX. That "\\n" is our choice: generation stops at `<|im_end|>`, so
  the model never produces it (the next prompt supplies it). Recipes differ here: Qwen-1's finetune.py
  also labels each turn's `<|im_start|>`/`<|im_end|>`/"\\n", QwenLM/Qwen2.5 examples/sft/finetune.py
  labels every token, LLaMA-Factory's qwen template labels "answer<|im_end|>\\n".

The answer spans are found by rendering the template on the conversation's prefixes (prefix + generation
prompt, then the answer + `<|im_end|>` must follow), so nothing here hard-codes ChatML's header text.
Each piece is tokenized on its own: the answer's tokens then are exactly what the model generates after
the `<|im_start|>assistant\\n` prompt at inference time. `PromptEncoder.check` decodes the labelled
spans back and compares them with the answers, character for character (the validator and tests use it).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from course_lib.data.image_tokens import expand_image_tokens, image_token_count
from course_lib.data.records import IMAGE_TOKEN, DataError, Sample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # what HF's cross-entropy skips
END_OF_TURN = "<|im_end|>"  # ChatML's end of a turn
TEMPLATES = ("plain", "chat")
# About 250k tokens of English, over 100x any context the course trains at; a longer sample is refused
# before tokenizing (a 50 MB string took 89 s and 7.9 GB of RAM to be found too long).
MAX_SAMPLE_CHARS = 1_000_000


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    n_images: int  # images whose tokens are in input_ids (all of them unless truncated)
    expected: tuple[str, ...]  # the text each labelled span must decode to
    truncated: bool = False


class PromptEncoder:
    """Encodes samples with one template for one processor; `truncate` and `check` work on the result."""

    def __init__(self, processor, template: str = "chat"):
        if template not in TEMPLATES:
            raise ValueError(f"template={template!r}; expected one of {TEMPLATES}")
        self.tokenizer = processor.tokenizer
        self.template = template
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.tokens_per_image = image_token_count(processor)
        self.control_tokens = [token for token in self.tokenizer.all_special_tokens if token != IMAGE_TOKEN]
        if template == "plain" and self.tokenizer.eos_token is None:
            raise DataError("processor", "template='plain' ends captions with the eos token; the tokenizer has none")
        if template == "chat" and (not self.tokenizer.chat_template or END_OF_TURN not in self.tokenizer.get_vocab()):
            raise DataError("processor", f"template='chat' needs a ChatML chat template ({END_OF_TURN}), as "
                                         "Qwen2/Qwen2.5 tokenizers have; use template='plain' otherwise")

    def tokens(self, text: str) -> list[int]:
        """Token ids of `text`, each `<image>` expanded to `tokens_per_image` image tokens."""
        return expand_image_tokens(text, self.tokenizer, self.image_token_id, self.tokens_per_image)

    def check_text(self, sample: Sample) -> None:
        """Raise DataError for text no tokenizer should see: over `MAX_SAMPLE_CHARS` (refused before it costs
        minutes and gigabytes to tokenize), or holding a control token such as `<|im_end|>`, which the
        tokenizer would turn into a real turn boundary, so the model would learn a conversation that the
        data never had."""
        n_chars = sum(len(message["content"]) for message in sample.messages)
        if n_chars > MAX_SAMPLE_CHARS:
            raise DataError("too_long", f"{n_chars:,} characters of text, over the {MAX_SAMPLE_CHARS:,} a sample "
                                        "may have")
        for i, message in enumerate(sample.messages):
            found = next((token for token in self.control_tokens if token in message["content"]), None)
            if found:
                raise DataError("control_token", f"turn {i} ({message['role']}) contains {found}, a chat-template "
                                                 "control token; it would be trained as a real one")

    def encode(self, sample: Sample) -> Encoded:
        self.check_text(sample)
        pieces = self._plain_pieces(sample) if self.template == "plain" else self._chat_pieces(sample)
        input_ids: list[int] = []
        labels: list[int] = []
        for text, learn in pieces:
            ids = self.tokens(text)
            input_ids += ids
            labels += ids if learn else [IGNORE_INDEX] * len(ids)
        expected = tuple(text for text, learn in pieces if learn)
        return Encoded(input_ids, labels, len(sample.images), expected)

    def _plain_pieces(self, sample: Sample) -> list[tuple[str, bool]]:
        turns = [m for m in sample.messages if m["role"] != "system"]
        if len(turns) != 2:
            raise DataError("plain_needs_one_exchange", f"the plain template takes one caption exchange, got "
                                                        f"{len(turns)} turns; use template='chat'")
        return [(IMAGE_TOKEN * len(sample.images), False), (turns[1]["content"] + self.tokenizer.eos_token, True)]

    def _render(self, messages: list[dict], prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)

    def _chat_pieces(self, sample: Sample) -> list[tuple[str, bool]]:
        messages = [dict(m) for m in sample.messages]
        full, pieces, done = self._render(messages), [], 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(self._render(messages[:i], prompt=True))  # ends with "<|im_start|>assistant\n"
            answer = message["content"] + END_OF_TURN
            if not full.startswith(answer, start):
                raise DataError("template", f"the chat template does not render answer {i} as generation prompt "
                                            f"+ answer + {END_OF_TURN}; cannot mask it")
            pieces += [(full[done:start], False), (answer, True)]
            done = start + len(answer)
        return [*pieces, (full[done:], False)]

    def truncate(self, encoded: Encoded, max_length: int) -> Encoded | None:
        """Cap at `max_length` without cutting through an image's tokens; None if nothing is left to learn.

        A cut inside an image's run moves back to the run's start, and that image (with any later ones)
        is dropped, so image tokens always match the pixel_values the dataset then loads.
        """
        if len(encoded.input_ids) > max_length:
            n_image_ids = sum(t == self.image_token_id for t in encoded.input_ids[:max_length])
            cut = max_length - n_image_ids % self.tokens_per_image
            encoded = replace(encoded, input_ids=encoded.input_ids[:cut], labels=encoded.labels[:cut],
                              n_images=n_image_ids // self.tokens_per_image, truncated=True)
        # Position 0 is never a target (labels are shifted by one inside the loss).
        return encoded if any(t != IGNORE_INDEX for t in encoded.labels[1:]) else None

    def check(self, encoded: Encoded) -> None:
        """Raise DataError("label_mismatch") unless the labelled spans decode to exactly the expected texts."""
        wrong = [i for i, (t, y) in enumerate(zip(encoded.input_ids, encoded.labels, strict=True))
                 if y not in (t, IGNORE_INDEX)]
        if wrong:
            raise DataError("label_mismatch", f"labels differ from input_ids at positions {wrong[:5]}")
        # Compared in NFC: Qwen's tokenizer normalises text to NFC, so an NFD "é" (e + combining accent) in the
        # data decodes as the one code point; that is the same answer, not a wrong label.
        spans = [unicodedata.normalize("NFC", t) for t in labelled_spans(encoded.labels, self.tokenizer)]
        expected = [unicodedata.normalize("NFC", t) for t in encoded.expected]
        if spans != expected:
            k = next(k for k in range(max(len(spans), len(expected))) if spans[k:k + 1] != expected[k:k + 1])
            raise DataError("label_mismatch", f"labelled span {k} decodes to {spans[k:k + 1]}, "
                                              f"expected {expected[k:k + 1]}")


def labelled_spans(labels: list[int], tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The text of each run of labels that carry loss, decoded verbatim (special tokens and spaces kept)."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return [tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False) for run in runs]
