"""Lesson 6 ex 3: reference log-probs of the LoRA-DPO run with adapters disabled vs the SFT model."""
import torch
torch.set_num_threads(1)
from minillm.runs import load_run, load_plain_run
from minillm.peft.apply import disable_adapters
from minillm.align.preferences import read_preferences, encode_pair, collate_pairs
from minillm.stages.dpo import concatenated_logps

pol, tok, cfg = load_run("/tmp/ans2/l6/dpo_lora")          # wrapped: LoRA adapters on c_attn
sft, _, _ = load_plain_run("/tmp/seeds_after/seed_0/sft")
pairs, _ = read_preferences("data/world/prefs_test.jsonl")
enc = [encode_pair(tok, p) for p in pairs]
batch = collate_pairs(enc, tok.pad_id)
with torch.no_grad():
    pi_w, pi_l = concatenated_logps(pol, batch)
    with disable_adapters(pol):
        ref_w, ref_l = concatenated_logps(pol, batch)
    sft_w, sft_l = concatenated_logps(sft, batch)
print("pairs", len(enc))
print("first pair  log pi_ref(y_w), log pi_ref(y_l) [adapters off]:", ref_w[0].item(), ref_l[0].item())
print("first pair  log pi_sft(y_w), log pi_sft(y_l) [SFT run]     :", sft_w[0].item(), sft_l[0].item())
print("first pair  log pi(y_w), log pi(y_l) [adapters on]          :", pi_w[0].item(), pi_l[0].item())
print("bit-for-bit equal, adapters off vs SFT:", torch.equal(ref_w, sft_w) and torch.equal(ref_l, sft_l))
print("max |adapters off - SFT|:", max((ref_w - sft_w).abs().max().item(), (ref_l - sft_l).abs().max().item()))
print("max |adapters on - SFT| :", max((pi_w - sft_w).abs().max().item(), (pi_l - sft_l).abs().max().item()))
print("mean (adapters on - SFT): chosen", (pi_w - sft_w).mean().item(), "rejected", (pi_l - sft_l).mean().item())
