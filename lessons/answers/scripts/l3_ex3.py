"""Lesson 3, exercise 3: packed vs unpacked SFT runs (exact match) and a document mask for one packed row."""
import json, torch
from minillm.runs import load_run
from minillm.eval.task import evaluate_instructions
from minillm.align.chat import load_chats, encode_chats, pack

recs = [json.loads(l) for l in open("data/world/sft_test.jsonl")]
for run in ("/tmp/ans/l3_sft150--no-packing", "/tmp/ans/l3_sft150--pack"):
    model, tok, _ = load_run(run)
    m = evaluate_instructions(model.eval(), tok, recs)
    print(run, {k: round(v, 3) for k, v in m.items() if isinstance(v, float)})

# data per step: examples are drawn uniformly, 32 rows per step
ex, _ = encode_chats(tok, load_chats("data/world/sft_train.jsonl"), model.config.block_size)
rows = pack(ex, model.config.block_size)
mean = lambda xs: sum(xs) / len(xs)
print(f"unpacked: {len(ex)} rows, {mean([len(e.ids) for e in ex]):.1f} tokens/row, "
      f"{mean([sum(e.loss_mask) for e in ex]):.1f} scored/row")
print(f"packed:   {len(rows)} rows, {mean([len(r.ids) for r in rows]):.1f} tokens/row, "
      f"{mean([sum(r.loss_mask) for r in rows]):.1f} scored/row, {len(ex) / len(rows):.2f} chats/row")

# ---- the document mask and restarted positions for one packed row --------------------------------
def doc_mask_and_positions(chat_lengths):
    """(1, 1, T, T) bool: query i sees key j iff same chat and j <= i; position ids restart at 0 per chat."""
    doc = torch.cat([torch.full((n,), k) for k, n in enumerate(chat_lengths)])  # chat index per token
    pos = torch.cat([torch.arange(n) for n in chat_lengths])
    T = len(doc)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = doc[:, None] == doc[None, :]
    return (causal & same).view(1, 1, T, T), pos

model, tok, _ = load_run("/tmp/seeds_after/seed_0/sft"); model.eval()
chats = ex[:3]
ids = torch.tensor([sum((c.ids for c in chats), [])])
mask, pos = doc_mask_and_positions([len(c.ids) for c in chats])
with torch.no_grad():
    x = model.wte(ids) + model.wpe(pos)
    for block in model.h:
        x, _ = block(x, mask=mask)
    packed_logits = model.lm_head(model.ln_f(x))
    plain = model(ids)  # cheap packing: plain causal attention, positions 0..T-1
    start = 0
    for k, c in enumerate(chats):
        alone = model(torch.tensor([c.ids]))
        sl = slice(start, start + len(c.ids)); start += len(c.ids)
        print(f"chat {k} ({len(c.ids)} tokens): max |doc-masked - alone| = "
              f"{(packed_logits[0, sl] - alone[0]).abs().max():.2e}, "
              f"max |plain packed - alone| = {(plain[0, sl] - alone[0]).abs().max():.2e}")
print("mask rows 0-2 of chat 1 start at column", len(chats[0].ids), "; positions:", pos.tolist()[:len(chats[0].ids) + 3])
