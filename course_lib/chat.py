"""Chat with a trained LLaVA: multi-turn, any number of images per turn, streamed token by token.

    python -m course_lib.chat --model runs/tiny/finetune_use_lora --image a.png --image b.png --prompt "Compare them."
    python -m course_lib.chat --model runs/tiny/finetune_use_lora   # interactive: /image PATH, /reset, /quit
    python -m course_lib.chat --model llava-hf/llava-interleave-qwen-0.5b-hf --image photo.jpg --prompt "What is this?"

Prompts are built by the processor's chat template from messages whose `content` lists
{"type": "image"} and {"type": "text"} items, so a turn renders as `<image>\\n...` exactly like the
training data. A text-only turn therefore gives the language model's own prompt, token for token.
Streaming follows transformers' TextIteratorStreamer recipe: `generate` runs in a thread and the
caller iterates over decoded text (https://huggingface.co/docs/transformers/main/en/internal/generation_utils#transformers.TextIteratorStreamer).
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import torch
from PIL import Image

from course_lib.data.images import ImageError, load_image
from course_lib.data.records import IMAGE_TOKEN
from course_lib.serving.generation import GenerationSettings, assistant_message, prepare_inputs, user_message
from course_lib.serving.loading import LoadedModel, load_trained
from course_lib.util.cli import Parser, UserError, command

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_TIMEOUT_S = 120.0  # per token; the first one also waits for the prompt's forward pass
# No tokenizer spends more than this many characters on one token on average in real text: a message longer
# than context x this cannot fit, and is refused before the tokenizer sees it.
CHARS_PER_TOKEN_BOUND = 32


class GenerationTimeout(TimeoutError):
    """No token arrived within the streamer's timeout."""


class _StopWhenSet:
    """A stopping criterion that ends generation once the reader has gone away."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_generate(model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase,
                    inputs: Mapping[str, torch.Tensor], settings: GenerationSettings,
                    timeout: float = DEFAULT_TIMEOUT_S) -> Iterator[str]:
    """Yield the answer's text as it is generated; an error inside `generate` is raised here, not hung on."""
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout)
    stop, failure = threading.Event(), []

    def run() -> None:
        try:
            model.generate(**inputs, **settings.generate_kwargs(), streamer=streamer,
                           stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]))
        except BaseException as err:  # handed to the reader, which re-raises it
            failure.append(err)
            streamer.end()  # the stop signal wakes the reader now instead of after `timeout`

    thread = threading.Thread(target=run, name="llava-generate", daemon=True)
    thread.start()
    try:
        yield from (piece for piece in streamer if piece)  # the streamer emits "" while a word is incomplete
    except queue.Empty:
        raise GenerationTimeout(f"no new token within {timeout:g} s; the model may be too slow for this "
                                f"device, raise the timeout or lower max_new_tokens") from None
    finally:
        stop.set()  # also when the reader stops early: generation ends at the next token
        thread.join(timeout)
    if failure:
        raise failure[0]


class Chat:
    """A conversation with one model. `ask` returns the answer; `stream` yields it piece by piece.

    The history (messages and the images they refer to, in order) only grows when an answer completes,
    so a failed or interrupted turn can simply be asked again.
    """

    def __init__(self, loaded: LoadedModel, settings: GenerationSettings | None = None,
                 system: str | None = None, timeout: float = DEFAULT_TIMEOUT_S):
        self.loaded = loaded
        self.settings = settings or GenerationSettings()
        self.system = system
        self.timeout = timeout
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.images: list[Image.Image] = []

    def turn(self, text: str, images: Iterable[Image.Image | str | Path] = ()) -> tuple[list[dict], list]:
        """The messages and images the next prompt would be built from (the history is not changed)."""
        placeholder = getattr(self.loaded.processor, "image_token", IMAGE_TOKEN)
        if placeholder in text:  # it would become image slots with no image behind them
            raise ValueError(f"the message contains {placeholder}, the image placeholder; attach images "
                             "instead (/image PATH, or the upload button)")
        limit = self.context_length * CHARS_PER_TOKEN_BOUND
        if len(text) > limit:  # refused before tokenizing: a pasted book costs no minutes and no RAM
            raise ValueError(f"the message is {len(text):,} characters, more than this model's context of "
                             f"{self.context_length} tokens can hold (at most {limit:,}); shorten it")
        new = [image if isinstance(image, Image.Image) else load_image(image) for image in images]
        return [*self.messages, user_message(text, len(new))], [*self.images, *new]

    @property
    def context_length(self) -> int:
        """How many tokens the language model attends over: prompt, history and answer together."""
        return self.loaded.model.config.text_config.max_position_embeddings

    def stream(self, text: str, images: Iterable[Image.Image | str | Path] = (), **settings) -> Iterator[str]:
        """Yield the answer as it is generated; `settings` override GenerationSettings fields for this turn."""
        messages, all_images = self.turn(text, images)
        model, processor = self.loaded.model, self.loaded.processor
        inputs = prepare_inputs(processor, [messages], [all_images], self.loaded.device, self.loaded.dtype,
                                **self.loaded.preprocessing)
        prompt, wanted = inputs["input_ids"].shape[1], settings.get("max_new_tokens", self.settings.max_new_tokens)
        if prompt + wanted > self.context_length:  # refused, not truncated: a cut prompt answers another question
            raise ValueError(f"the prompt is {prompt} tokens with the conversation so far; with up to {wanted} new "
                             f"ones it passes the model's context of {self.context_length}; /reset or shorten it")
        pieces = []
        for piece in stream_generate(model, processor.tokenizer, inputs, replace(self.settings, **settings),
                                     self.timeout):
            pieces.append(piece)
            yield piece
        self.messages, self.images = [*messages, assistant_message("".join(pieces))], all_images

    def ask(self, text: str, images: Iterable[Image.Image | str | Path] = (), **settings) -> str:
        return "".join(self.stream(text, images, **settings))


# --- command line -------------------------------------------------------------------------------------

HELP = "commands: /image PATH adds an image to your next message, /reset starts over, /quit ends"


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m course_lib.chat", description=__doc__.split("\n")[0])
    parser.add_argument("--model", "--model_name_or_path", dest="model", required=True,
                        help="a trained output folder (full, merged, or LoRA adapter) or a hub LLaVA's id, e.g. "
                             "llava-hf/llava-interleave-qwen-0.5b-hf")
    parser.add_argument("--image", action="append", default=[], help="an image for the (first) prompt; repeatable")
    parser.add_argument("--prompt", help="ask once and exit; without it, chat interactively on stdin")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--system", help="a system prompt (default: the chat template's)")
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best one present)")
    return parser


def _say(chat: Chat, text: str, images: list[Image.Image], out) -> None:
    for piece in chat.stream(text, images):
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()


def interact(chat: Chat, lines: Iterable[str], pending: list[Image.Image], out: TextIO | None = None,
             err: TextIO | None = None) -> None:
    """The interactive loop: plain lines are messages, `/image`, `/reset` and `/quit` are commands."""
    out, err = out or sys.stdout, err or sys.stderr
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        command, _, arg = line.partition(" ")
        if command == "/quit":
            return
        if command == "/reset":
            chat.reset()
            pending.clear()
            print("(conversation cleared)", file=err)
        elif command == "/image":
            try:
                pending.append(load_image(arg.strip()))
                print(f"(image added: {arg.strip()}; {len(pending)} for your next message)", file=err)
            except ImageError as error:
                print(f"error: {error}", file=err)
        elif command.startswith("/"):
            print(f"unknown command {command}; {HELP}", file=err)
        else:
            try:
                _say(chat, line, pending, out)
            except (GenerationTimeout, ValueError) as error:  # the turn is not kept; the conversation goes on
                print(f"\nerror: {error}", file=err)
            pending.clear()


@command
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:  # bad images and settings fail before the slow model load
        images = [load_image(path) for path in args.image]
        settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.do_sample)
    except ValueError as error:
        raise UserError(str(error)) from None
    loaded = load_trained(args.model, device=args.device)
    chat = Chat(loaded, settings, system=args.system)
    try:
        if args.prompt is not None:
            _say(chat, args.prompt, images, sys.stdout)
        else:
            print(f"chatting with {loaded.path} ({loaded.kind}, {loaded.device}); {HELP}", file=sys.stderr)
            interact(chat, sys.stdin, images)
    except (GenerationTimeout, ValueError) as error:  # a prompt too long for the context, say
        raise UserError(str(error)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
