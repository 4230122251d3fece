"""Full fine-tuning of SD v1/v2 (CONTRACT §H, §I): config, data, loss, optimizers, the recipe and saving."""
