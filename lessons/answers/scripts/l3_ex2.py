"""Lesson 3, exercise 2 (run inside /tmp/ans/copy with sft_loss returning (sum / n, 1)): the numbers."""
import sys, tempfile, pathlib
sys.path[:0] = ["/tmp/ans/copy", "/tmp/ans/copy/tests"]
import torch, minillm; print("minillm from", minillm.__file__)
from test_sft_stage import _chats_of_different_lengths, _reference_gradients, _train_one_step, _norm
from minillm.tokenizer import Tokenizer
tok = Tokenizer.load("data/tokenizer")
ex = _chats_of_different_lengths(tok)
g, pm, mean_loss = _reference_gradients(tok, ex)
print(f"token-mean loss {mean_loss:.4f}; |global grad| {_norm(g):.4f}; |mean-of-means grad| {_norm(pm):.4f}")
tmp = pathlib.Path(tempfile.mkdtemp(dir="/tmp/ans"))
for accum in (1, 4):
    upd, rec = _train_one_step(tmp, tok, ex, accum)
    print(f"accum {accum}: logged loss {rec['loss']:.4f}, logged grad_norm {rec['grad_norm']:.4f}")
