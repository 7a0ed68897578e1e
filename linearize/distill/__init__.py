"""Distillation: the stages, their losses and teacher signal, the logit cache, the loop, memory estimates."""
