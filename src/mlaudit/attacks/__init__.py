"""Attacks: membership inference (:mod:`mlaudit.attacks.membership`) and the objectives of targeted
poisoning for the crafting engine (:mod:`mlaudit.attacks.poisoning`); evasion follows."""
