"""Lesson 7 ex 5: can a series adapter h' = h + s W_up f(W_down h + b_down) + b_up be written as h' = (I + dW) h + c?
Fit the best affine map by least squares on 8192 inputs h ~ N(0, I) (d = 128, m = 8) and report the relative
residual ||h' - fit|| / ||h' - h|| (0 = mergeable)."""
import torch, torch.nn.functional as F
torch.manual_seed(0)
d, m, s, n = 128, 8, 1.0, 8192
h = torch.randn(n, d, dtype=torch.float64)
X = torch.cat([h, torch.ones(n, 1, dtype=torch.float64)], 1)
for std in (1e-2, 0.1, 0.5):
    Wd = torch.randn(m, d, dtype=torch.float64) * std; Wu = torch.randn(d, m, dtype=torch.float64) * std
    for name, f in (("identity", lambda x: x), ("swish", F.silu), ("relu", F.relu)):
        out = h + s * (f(h @ Wd.T) @ Wu.T)
        coef = torch.linalg.lstsq(X, out).solution
        res = (out - X @ coef).norm() / (out - h).norm()
        print(f"weights std {std:<5} f={name:<8} residual of the best affine merge / adapter output = {res:.3e}")
