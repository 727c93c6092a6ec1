"""Tiny offline fixtures: a random Llama-style model with a byte-level BPE tokenizer and chat
template, and GSM8K-format rows. Built from configs in seconds; nothing is downloaded."""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# grpo.kernels builds its C kernels here: x86-64 with AVX2 and a C compiler
KERNELS_BUILDABLE = (
    platform.machine().lower() in ("x86_64", "amd64")
    and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    and (shutil.which("cc") or shutil.which("gcc")) is not None
)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

GSM8K_ROWS = {
    "train": [
        (
            "Tom has 3 apples and buys 4 more. How many apples does he have?",
            "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7",
        ),
        ("A book costs $12. How much do 3 books cost?", "3 * 12 = <<3*12=36>>36\n#### 36"),
        (
            "Sam ran 5 miles on Monday and 6 on Tuesday. How many miles in total?",
            "5 + 6 = <<5+6=11>>11\n#### 11",
        ),
        (
            "A farm has 1,000 hens and sells 20. How many are left?",
            "1000 - 20 = <<1000-20=980>>980\n#### 980",
        ),
        ("There are 8 cookies shared by 2 kids. How many each?", "8 / 2 = <<8/2=4>>4\n#### 4"),
        ("Mia has 10 pens and loses 3. How many pens now?", "10 - 3 = <<10-3=7>>7\n#### 7"),
        (
            "A car travels 60 miles per hour for 2 hours. How far?",
            "60 * 2 = <<60*2=120>>120\n#### 120",
        ),
        ("Lee buys 2 shirts at $15 each. What is the total?", "2 * 15 = <<2*15=30>>30\n#### 30"),
        (
            "A class has 12 boys and 13 girls. How many students?",
            "12 + 13 = <<12+13=25>>25\n#### 25",
        ),
        ("Ann bakes 4 trays of 6 muffins. How many muffins?", "4 * 6 = <<4*6=24>>24\n#### 24"),
    ],
    "test": [
        ("Janet has 16 eggs and eats 3. How many are left?", "16 - 3 = <<16-3=13>>13\n#### 13"),
        ("A pen costs $2. How much do 5 pens cost?", "5 * 2 = <<5*2=10>>10\n#### 10"),
        ("Bob reads 7 pages a day for 3 days. How many pages?", "7 * 3 = <<7*3=21>>21\n#### 21"),
        (
            "A shop sold 1,200 cups and 300 plates. How many items?",
            "1200 + 300 = <<1200+300=1500>>1500\n#### 1,500",
        ),
        ("Kim has 9 stickers and gets 9 more. How many?", "9 + 9 = <<9+9=18>>18\n#### 18"),
        ("A box holds 6 eggs. How many eggs in 4 boxes?", "6 * 4 = <<6*4=24>>24\n#### 24"),
    ],
}


def write_gsm8k(folder: Path) -> Path:
    """Write official-format train.jsonl/test.jsonl fixture files into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in GSM8K_ROWS.items():
        with open(folder / f"{split}.jsonl", "w") as fh:
            for question, answer in rows:
                fh.write(json.dumps({"question": question, "answer": answer}) + "\n")
    return folder


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (~400 tokens) trained on the fixture text and tags."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [q + " " + a for rows in GSM8K_ROWS.values() for q, a in rows]
    corpus += ["<reasoning>\n</reasoning>\n<answer>\n</answer> Respond in the following format"]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token=None,
    )
    fast.chat_template = CHATML
    return fast


def build_model(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, arch: str = "llama", **config
) -> LlamaForCausalLM:
    """A 2-layer, 32-wide random Llama (or Qwen2: q/k/v biases) whose EOS is `<|im_end|>`;
    `config` overrides config fields."""
    torch.manual_seed(seed)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[arch]
    settings = config_class(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=eos,
        **config,
    )
    model = model_class(settings)
    model.generation_config = GenerationConfig(eos_token_id=[eos], pad_token_id=eos)
    return model


def write_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Save a tiny random model + tokenizer as a plain HF folder."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


SYSTEM = "Respond in the following format"


def attentive(model):
    """`model` with embeddings x5 and attention weights x10: at HF's initialization the logits
    are so flat and the attention output so small that zeroing attention changes no token, so
    a token comparison could not notice broken attention."""
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(5)
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                proj.weight.mul_(10)
    return model


def fixture_prompts(tokenizer, n=3):
    """Chat prompts of the first `n` fixture training questions."""
    from grpo.prompts import chat_prompt

    questions = [q for q, _ in GSM8K_ROWS["train"][:n]]
    return [chat_prompt(tokenizer, q, SYSTEM) for q in questions]
