"""Hyperparameter search over ordinary training runs (`vision-ft tune`, `vision_ft.tune`)."""
