"""Lesson 8 ex 4: how much closer to the fp32 base does LoftQ start? Weight error of every quantised layer and the
logit error / base-corpus loss at step 0, QLoRA (B = 0) vs LoftQ (1 iteration), r = 8, alpha 16, all linear layers."""
import copy, torch, torch.nn.functional as F
torch.set_num_threads(1)
from minillm.runs import load_run
from minillm.peft.apply import apply_peft, dequantize_model, linear_weights
from minillm.datasets import tokenize_corpus
base, tok, _ = load_run("/tmp/seeds_after/seed_0/base")
W = linear_weights(base)
ids = tokenize_corpus("data/world/corpus_val.txt", tok)[: 16 * 128].view(16, 128)
with torch.no_grad():
    ref = base(ids)
    ref_loss = F.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), ids[:, 1:].reshape(-1)).item()
print(f"fp32 base: val loss {ref_loss:.4f}")
for name, kw in (("qlora", {}), ("loftq", {"loftq_iters": 1})):
    m = apply_peft(copy.deepcopy(base), "qlora", r=8, lora_alpha=16, **kw).eval()
    merged = dequantize_model(copy.deepcopy(m))
    from minillm.peft.apply import merge_peft
    plain = merge_peft(merged)
    Wq = linear_weights(plain)
    err = sum(float((W[k] - Wq[k]).double().square().sum()) for k in W) ** 0.5
    norm = sum(float(W[k].double().square().sum()) for k in W) ** 0.5
    with torch.no_grad():
        out = m(ids)
        loss = F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1)).item()
    print(f"{name}: ||W - (deq(Q) + sBA)||_F / ||W||_F = {err / norm:.5f}, val loss {loss:.4f} "
          f"(+{loss - ref_loss:.4f}), max |logit - fp32 logit| {(out - ref).abs().max().item():.4f}")
