"""Attacks: membership inference (:mod:`mlaudit.attacks.membership`); poisoning and evasion follow."""
