"""RLP training recipe: the same entry point as `python -m nemo_rlp.train`, for `torchrun recipes/train.py`.

    torchrun --nproc-per-node 8 recipes/train.py +experiment=rlp_qwen3_1p7b trainer.steps=100
"""

from nemo_rlp.train import main

if __name__ == "__main__":
    main()
