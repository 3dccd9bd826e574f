"""AREIR: attentional randomized ensembles for image retrieval.

A shared ResNet stem (conv1 .. layer1) feeds E member branches (layer2 [+ squeeze-excitation], layer3, layer4,
pooling, a linear classifier). Member e is trained with cross-entropy to predict the *meta-class* of an image: its
class's group in a random balanced partition of the C training classes into M groups, drawn independently per
member. Retrieval uses the E L2-normalised member logit vectors, concatenated (E*M dims), with cosine similarity.

    python train.py experiment=digits_areir                  # CPU demo on the embedded digits (~1-3 min)
    python train.py experiment=cub_areir trainer=gpu         # reference recipe (bf16-mixed, one 80 GB GPU)
    python train.py experiment=sop_areir trainer=ddp         # 8 GPUs, SyncBatchNorm
    python eval.py ckpt_path=run/checkpoints/epoch_XXX.ckpt query=image.jpg top_k=8   # retrieval grid

Modules: `meta_classes` (partitions, collision counting, collision-free assignment), `model` (stem + stacked
members, three equivalent member formulations), `module` (LightningModule, checkpointed assignment).
Benchmarks: ``bench/areir_members.py`` (member formulations), ``bench/areir_ensemble_vs_single.py``.
"""
