"""Epsilon of given DP-SGD settings, and the noise a target epsilon needs (instant).
    python examples/byo/epsilon.py
"""
import mlaudit.privacy

# CIFAR-10-sized training: 50,000 examples, batch 256 (Poisson rate q = 256/50000), 30 epochs
q, steps, delta = 256 / 50_000, 30 * 50_000 // 256, 1e-5
for accountant in ("rdp", "prv"):
    eps = mlaudit.privacy.epsilon(noise_multiplier=1.1, sample_rate=q, steps=steps, delta=delta, accountant=accountant)
    print(f"{accountant}: sigma 1.1, q {q:.5f}, {steps} steps -> epsilon {eps:.3f} at delta {delta}")
sigma = mlaudit.privacy.calibrate_noise(target_epsilon=4.0, sample_rate=q, steps=steps, delta=delta)
print(f"epsilon 4 needs noise multiplier {sigma:.4f}")
