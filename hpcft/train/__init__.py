"""The shared training entrypoint: `python -m hpcft.train --model_name=DIR --data_path=FILE ...`.

Kept import-light: the spec loader imports TrainConfig from here without pulling in torch.
"""
