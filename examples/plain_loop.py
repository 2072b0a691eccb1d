"""GFlowNet fine-tuning in a plain PyTorch loop: fastgfn's fused log-probs and SubTB loss in
your own training code. A tiny random Llama learns to write one digit after its prompt and
stop, every digit equally likely (tokens 0-9 are the digits; run time: seconds on a CPU).
"""
import torch
import transformers

import fastgfn

torch.manual_seed(0)
PROMPT, STOP, B, T = 10, 11, 16, 2  # a one-token prompt, the stop token, rows, max new tokens
model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    vocab_size=12, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)


def log_reward(tokens):  # log R of stopping after `tokens`: 0 for one digit, -20 otherwise
    return 0.0 if len(tokens) == 1 and tokens[0] < 10 else -20.0


@torch.no_grad()
def sample(n):  # ids [n, 1 + T] (prompt, tokens, 0-padding after a stop) and lengths [n]
    ids, lengths = torch.full((n, 1), PROMPT), torch.zeros(n, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    for _ in range(T):
        token = torch.distributions.Categorical(logits=model(ids).logits[:, -1]).sample()
        done |= token == STOP
        lengths += (~done).long()
        ids = torch.cat([ids, torch.where(done, 0, token)[:, None]], dim=1)
    return ids, lengths


for _ in range(100):  # steps
    ids, lengths = sample(B)
    log_r = torch.tensor([[log_reward(row[:t]) for t in range(T + 1)]  # every prefix's reward
                          for row in ids[:, 1:].tolist()])
    log_pf, log_pterm = fastgfn.causal_lm_gfn_logprobs(model, ids, 1, STOP)  # prompt_len = 1
    loss = fastgfn.subtb_loss(log_pf, log_pterm, log_r, lengths)
    opt.zero_grad()
    loss.backward()
    opt.step()

ids, lengths = sample(1000)
digits = [row[0] for row, n in zip(ids[:, 1:].tolist(), lengths.tolist()) if n == 1 and row[0] < 10]
counts = torch.bincount(torch.tensor(digits, dtype=torch.long), minlength=10)
print(f"one digit then stop: {len(digits) / 1000:.3f}; digit counts: {counts.tolist()}")
