"""The real checkpoints' shapes, in one place: CLIP-L/336 and Qwen2.5-Instruct, as their config.json files say.

Copied from the hub's config files (no internet here); check them, when online, with
`transformers.AutoConfig.from_pretrained(name)`. The model tour (`lessons.inspect_llava`) computes parameter
counts from them on the meta device (303.5M, 494.0M and 7.62B, as the model cards say), and the speed
benchmark (`lessons.speed`) builds random-weight models of these shapes.
"""

from __future__ import annotations

# openai/clip-vit-large-patch14-336's vision_config.
CLIP_L_336 = dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, projection_dim=768, hidden_act="quick_gelu")
QWEN2_5 = {
    "Qwen/Qwen2.5-0.5B-Instruct": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True),
    "Qwen/Qwen2.5-7B-Instruct": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                     tie_word_embeddings=False),
}
QWEN2_5_TOKENIZER_LEN = 151665  # len(tokenizer) of every Qwen2.5 model: 151643 BPE tokens + 22 special
