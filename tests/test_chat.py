"""The chat API and CLI: text-only answers are the LLM's, multi-image multi-turn chats are reproducible,
streaming surfaces errors and timeouts, bad images end the CLI with one line and exit code 2."""

import io
import subprocess
import sys
import threading
import time

import pytest
import torch
from PIL import Image
from test_inference import write_bad_images
from transformers import AutoModelForCausalLM, AutoTokenizer

from course_lib import chat as chat_module
from course_lib.chat import Chat, GenerationTimeout, interact
from course_lib.data.images import load_image
from course_lib.serving.generation import GenerationSettings


@pytest.fixture(scope="module")
def images(eval_pngs):
    return eval_pngs, [Image.open(p).convert("RGB") for p in eval_pngs]


def test_text_only_answers_are_the_source_llms(tiny_world, loaded):
    llm = AutoModelForCausalLM.from_pretrained(tiny_world.llm, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_world.llm)
    for question in ("How many corners does a square have?", "Describe the image."):
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        out = llm.generate(**ids, max_new_tokens=20, do_sample=False)
        expected = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert Chat(loaded).ask(question, max_new_tokens=20) == expected


TURNS = [("Hello, what can you see?", 0), ("How many circles are there?", 1), ("Which image has more circles?", 2)]


def _three_turns(loaded, images):
    chat = Chat(loaded, GenerationSettings(max_new_tokens=12))
    used = iter(images)
    return chat, [chat.ask(text, [next(used) for _ in range(n)]) for text, n in TURNS]


def test_three_turns_with_0_1_2_images_are_deterministic_and_equal_generate(loaded, images):
    chat, answers = _three_turns(loaded, images[1])
    assert _three_turns(loaded, images[1])[1] == answers
    assert len(chat.images) == 3 and [m["role"] for m in chat.messages] == ["user", "assistant"] * 3

    # The same prompts, built by hand and run through a plain model.generate.
    model, processor = loaded.model, loaded.processor
    messages, used = [], []
    for (text, n), answer in zip(TURNS, answers, strict=True):
        used += images[1][len(used):len(used) + n]
        messages.append({"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": text}]})
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=prompt, images=used or None, return_tensors="pt")
        assert (inputs["input_ids"] == model.config.image_token_index).sum().item() == 4 * len(used)  # 2x2 patches
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        assert processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True) == answer
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})


def test_streaming_yields_pieces_that_join_to_the_answer(loaded):
    pieces = list(Chat(loaded).stream("Describe the image.", max_new_tokens=20))
    assert len(pieces) > 2 and all(pieces)
    assert "".join(pieces) == Chat(loaded).ask("Describe the image.", max_new_tokens=20)


def test_an_error_in_generation_reaches_the_caller_fast(loaded, monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    chat = Chat(loaded, timeout=30)
    monkeypatch.setattr(loaded.model, "generate", broken)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="simulated"):
        chat.ask("Hi")
    assert time.monotonic() - start < 5  # re-raised at once, not after the 30 s timeout
    assert chat.messages == []  # a failed turn leaves no trace in the history


def test_a_stalled_generation_times_out(loaded, monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(loaded.model, "generate", lambda **kwargs: release.wait(10))
    with pytest.raises(GenerationTimeout, match="no new token within 0.3 s"):
        Chat(loaded, timeout=0.3).ask("Hi")
    release.set()


def test_leaving_a_stream_early_stops_generation(loaded):
    stream = Chat(loaded).stream("Describe the image.", max_new_tokens=500)
    next(stream)
    stream.close()  # what a `break` out of the loop does
    assert not any(t.name == "llava-generate" and t.is_alive() for t in threading.enumerate())


def test_generation_settings_are_checked_and_sampling_works(loaded):
    with pytest.raises(ValueError, match="temperature=0"):
        GenerationSettings(do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="top_p=1.5"):
        GenerationSettings(top_p=1.5)
    torch.manual_seed(0)
    first = Chat(loaded).ask("Describe the image.", do_sample=True, temperature=1.5, max_new_tokens=20)
    torch.manual_seed(0)
    assert Chat(loaded).ask("Describe the image.", do_sample=True, temperature=1.5, max_new_tokens=20) == first


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "course_lib.chat", *args], input=stdin, capture_output=True,
                          text=True, timeout=120)


def test_cli_prompt_with_two_images(empty_llava, loaded, images):
    paths, pil = images
    proc = _cli("--model", str(empty_llava[0]), "--image", str(paths[0]), "--image", str(paths[1]),
                "--prompt", "Which image has more circles?", "--max_new_tokens", "12", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == Chat(loaded).ask("Which image has more circles?", pil[:2], max_new_tokens=12) + "\n"


def test_cli_interactive_mode(empty_llava, loaded, images, tmp_path, monkeypatch, capsys):
    paths, pil = images
    script = "\n".join([f"/image {paths[0]}", "How many circles are there?", f"/image {tmp_path / 'nope.png'}",
                        "/reset", "Hi", "/quit", "lost"])
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert chat_module.main(["--model", str(empty_llava[0]), "--max_new_tokens", "8"]) == 0
    out, err = capsys.readouterr()
    expected = [Chat(loaded).ask("How many circles are there?", pil[:1], max_new_tokens=8),
                Chat(loaded).ask("Hi", max_new_tokens=8)]  # after /reset: a fresh conversation
    assert out == "".join(f"{reply}\n" for reply in expected)  # "lost", after /quit, is never answered
    assert f"error: {tmp_path / 'nope.png'}: no such file" in err and "Traceback" not in err


def test_interactive_commands_in_process(loaded, images):
    out, err = io.StringIO(), io.StringIO()
    chat = Chat(loaded, GenerationSettings(max_new_tokens=8))
    interact(chat, [f"/image {images[0][0]}", f"/image {images[0][1]}", "/bogus", "Compare.", "Again."], [],
             out, err)
    replies = [m["content"][0]["text"] for m in chat.messages if m["role"] == "assistant"]
    assert len(chat.images) == 2 and len(chat.messages) == 4 and out.getvalue() == "".join(f"{r}\n" for r in replies)
    assert "unknown command /bogus" in err.getvalue()


def test_cli_bad_images_get_one_line_and_exit_code_2(empty_llava, images, tmp_path, capsys):
    for path, expected in write_bad_images(tmp_path, images[0][0]).items():
        code = chat_module.main(["--model", str(empty_llava[0]), "--image", str(images[0][0]),
                                 "--image", str(path), "--prompt", "Hi"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and f"error: {path}: {expected}" in err
    proc = _cli("--model", str(empty_llava[0]), "--image", str(tmp_path / "broken.png"), "--prompt", "Hi")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {tmp_path / 'broken.png'}: corrupt or truncated image (OSError)"


def test_cli_bad_model_folder(tmp_path, capsys):
    assert chat_module.main(["--model", str(tmp_path), "--prompt", "Hi"]) == 2
    assert "neither config.json nor adapter_config.json" in capsys.readouterr().err


def test_greedy_is_greedy_whatever_the_checkpoint_generation_config_asks(loaded, eval_pngs):
    """Qwen2.5's generation_config samples with top_k 20 and penalises repeats (1.1): greedy must clear both."""
    from course_lib.serving.generation import generate_replies, prepare_inputs, user_message

    conversations = [[user_message("What color is the object? red or blue?", 1)]]
    images = [[load_image(eval_pngs[0])]]
    config = loaded.model.generation_config
    saved = {k: getattr(config, k) for k in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")}
    try:
        config.update(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=50.0)
        answer = generate_replies(loaded, conversations, images, GenerationSettings(max_new_tokens=6))
    finally:
        config.update(**saved)
    # Greedy by hand: the argmax of the model's own logits, token after token.
    inputs = prepare_inputs(loaded.processor, conversations, images, loaded.device, loaded.dtype)
    ids, eos = inputs["input_ids"], set(config.eos_token_id if isinstance(config.eos_token_id, list)
                                        else [config.eos_token_id])
    new = []
    with torch.no_grad():
        for _ in range(6):
            logits = loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  pixel_values=inputs["pixel_values"]).logits[0, -1]
            token = int(logits.argmax())
            if token in eos:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert answer == [loaded.processor.tokenizer.decode(new, skip_special_tokens=True)]


def test_typing_the_image_placeholder_is_an_error_line_and_the_session_goes_on(loaded, images):
    """`<image>` typed in a message used to crash the interactive session (and lose its history)."""
    out, err = io.StringIO(), io.StringIO()
    chat = Chat(loaded, GenerationSettings(max_new_tokens=8))
    interact(chat, [f"/image {images[0][0]}", "Describe it.", "What is <image> here?", "And now?"], [], out, err)
    assert "error: the message contains <image>, the image placeholder" in err.getvalue()
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]  # two turns kept
    assert len(chat.images) == 1
