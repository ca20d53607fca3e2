"""Our DPO / SimPO / ORPO / Bradley-Terry losses and DPO sequence log-probs against TRL 0.19's own code.

TRL's loss code lives in trainer methods that read hyperparameters from `self`; we call them unbound
with a SimpleNamespace as `self`, so no model, tokenizer or dataset is needed. Skipped when TRL is not
installed or its trainers cannot be imported (TRL 0.19 needs transformers 4.x, pandas and datasets):

    pip install --no-deps trl==0.19.0   # plus transformers<5, datasets, pandas if not present
"""
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")
try:
    from trl.trainer.cpo_trainer import CPOTrainer
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.orpo_trainer import ORPOTrainer
    from trl.trainer.reward_trainer import RewardTrainer
except Exception as e:  # an incompatible transformers/datasets raises ImportError or worse at import time
    pytest.skip(f"trl {trl.__version__} is installed but its trainers cannot be imported: {e}",
                allow_module_level=True)
if not trl.__version__.startswith("0.19."):
    pytest.skip(f"these tests call TRL 0.19's internal API; found trl {trl.__version__}", allow_module_level=True)

from minillm.align.dpo import dpo_loss, orpo_loss, simpo_loss  # noqa: E402
from minillm.align.logprobs import sequence_logprobs  # noqa: E402
from minillm.align.reward import bradley_terry_loss  # noqa: E402

CPU = SimpleNamespace(device=torch.device("cpu"))


def random_logps(seed: int, B: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-20 * torch.rand(B, generator=g, dtype=torch.float64) for _ in range(4)]


def trl_dpo_self(beta, loss_type, label_smoothing=0.0, reference_free=False):
    return SimpleNamespace(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                           reference_free=reference_free, f_divergence_type="reverse_kl",
                           f_divergence_params=None, accelerator=CPU, args=SimpleNamespace(discopop_tau=0.05))


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.0), ("robust", 0.2),
                                           ("hinge", 0.0), ("ipo", 0.0)])
@pytest.mark.parametrize("reference_free", [False, True])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_matches_trl(loss_type, eps, reference_free, beta):
    logps = random_logps(0)
    if loss_type == "ipo":  # TRL feeds IPO per-token averaged log-probs: small magnitudes
        logps = [x / 10 for x in logps]
    ours = dpo_loss(*logps, beta=beta, loss_type=loss_type, label_smoothing=eps, reference_free=reference_free)
    theirs = DPOTrainer.dpo_loss(trl_dpo_self(beta, loss_type, eps, reference_free), *logps)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("beta,gamma,eps", [(0.1, 0.5, 0.0), (2.0, 1.0, 0.0), (2.0, 0.5, 0.2)])
def test_simpo_matches_trl_cpo(beta, gamma, eps):
    pc, pr, _, _ = random_logps(1)
    avg_c, avg_r = pc / 10, pr / 10
    me = SimpleNamespace(beta=beta, loss_type="simpo", simpo_gamma=gamma, label_smoothing=eps, accelerator=CPU)
    theirs = CPOTrainer.cpo_loss(me, avg_c, avg_r)
    for a, b in zip(simpo_loss(avg_c, avg_r, beta=beta, gamma=gamma, label_smoothing=eps), theirs):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_orpo_matches_trl():
    pc, pr, _, _ = random_logps(2)
    avg_c, avg_r = pc / 10, pr / 10
    nll = torch.tensor(1.7, dtype=torch.float64)
    or_losses, r_w, r_l, _, _ = ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=0.1, accelerator=CPU), avg_c, avg_r)
    ours, our_w, our_l = orpo_loss(avg_c, avg_r, nll, beta=0.1)
    # TRL: loss = nll - mean(beta * log sigma(log OR)); ours is per pair, so its mean is the same number
    torch.testing.assert_close(ours.mean(), nll - or_losses.mean(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(our_w, r_w)
    torch.testing.assert_close(our_l, r_l)


@pytest.mark.parametrize("use_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01])
def test_bradley_terry_matches_trl_reward_trainer(use_margin, center):
    g = torch.Generator().manual_seed(3)
    r_c, r_r, margin = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3))

    def fake_model(input_ids, attention_mask, return_dict):  # TRL's model returns logits (B, 1)
        return {"logits": (r_c if input_ids[0, 0] == 1 else r_r)[:, None]}

    inputs = {"input_ids_chosen": torch.ones(5, 2, dtype=torch.long), "attention_mask_chosen": torch.ones(5, 2),
              "input_ids_rejected": torch.zeros(5, 2, dtype=torch.long), "attention_mask_rejected": torch.ones(5, 2)}
    if use_margin:
        inputs["margin"] = margin[:, None]
    me = SimpleNamespace(args=SimpleNamespace(center_rewards_coefficient=center))
    theirs = RewardTrainer.compute_loss(me, fake_model, inputs)
    ours = bradley_terry_loss(r_c, r_r, margin=margin if use_margin else None, center_coef=center)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)


class HFLike(torch.nn.Module):
    """Our GPT behind the call TRL makes: model(input_ids, attention_mask=..., **kwargs).logits."""

    def __init__(self, gpt: torch.nn.Module) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.gpt(input_ids, attention_mask=attention_mask))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_sequence_logprobs_match_trl_concatenated_forward(tiny_model, loss_type):
    torch.manual_seed(0)
    prompts = [torch.randint(1, 97, (n,)) for n in (3, 5)]
    chosen = [torch.randint(1, 97, (n,)) for n in (4, 2)]
    rejected = [torch.randint(1, 97, (n,)) for n in (3, 6)]

    def pad(seqs, left):
        T = max(len(s) for s in seqs)
        ids, mask = torch.zeros(len(seqs), T, dtype=torch.long), torch.zeros(len(seqs), T, dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(T - len(s), T) if left else slice(0, len(s))
            ids[i, sl], mask[i, sl] = s, 1
        return ids, mask

    batch = {}
    batch["prompt_input_ids"], batch["prompt_attention_mask"] = pad(prompts, left=True)  # TRL's collator layout
    batch["chosen_input_ids"], batch["chosen_attention_mask"] = pad(chosen, left=False)
    batch["rejected_input_ids"], batch["rejected_attention_mask"] = pad(rejected, left=False)
    me = SimpleNamespace(
        concatenated_inputs=DPOTrainer.concatenated_inputs, padding_value=0, aux_loss_enabled=False,
        is_encoder_decoder=False, max_length=None, truncation_mode="keep_end", use_logits_to_keep=False,
        padding_free=False, use_weighting=False, loss_type=loss_type,
        args=SimpleNamespace(rpo_alpha=None, ld_alpha=None),
    )
    with torch.no_grad():
        out = DPOTrainer.concatenated_forward(me, HFLike(tiny_model), batch)
        # ours: prompt ++ response, right-padded, loss_mask on the response tokens
        seqs = [torch.cat([p, c]) for p, c in zip(prompts, chosen)]
        seqs += [torch.cat([p, r]) for p, r in zip(prompts, rejected)]
        ids, attn = pad(seqs, left=False)
        loss_mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts + prompts):
            loss_mask[i, len(p):] = attn[i, len(p):]
        logps = sequence_logprobs(tiny_model, ids, loss_mask, attn, average=loss_type == "ipo")
    torch.testing.assert_close(logps[:2], out["chosen_logps"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logps[2:], out["rejected_logps"], atol=1e-5, rtol=1e-5)
