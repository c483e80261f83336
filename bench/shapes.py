"""Parameter-tensor sizes of the two reference models, without needing torchvision/CLIP."""

from __future__ import annotations


def resnet18_sizes(num_classes: int = 1000) -> list[int]:
    """Sizes of ResNet-18's parameter tensors in order (11,689,512 in all)."""
    sizes = [64 * 3 * 7 * 7, 64, 64]  # stem conv + bn
    in_ch = 64
    for out_ch, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        for block in range(2):
            cin = in_ch if block == 0 else out_ch
            sizes += [out_ch * cin * 9, out_ch, out_ch, out_ch * out_ch * 9, out_ch, out_ch]
            if block == 0 and (stride != 1 or cin != out_ch):
                sizes += [out_ch * cin, out_ch, out_ch]  # downsample conv + bn
        in_ch = out_ch
    sizes += [512 * num_classes, num_classes]
    return sizes


def clip_vit_b32_visual_sizes() -> list[int]:
    """Sizes of CLIP ViT-B/32's image-encoder parameter tensors (87,849,216 in all)."""
    width, layers, patch, tokens, embed = 768, 12, 32, 50, 512
    sizes = [width * 3 * patch * patch, width, tokens * width, width, width]  # conv, cls, pos, ln_pre
    for _ in range(layers):
        sizes += [width, width, 3 * width * width, 3 * width, width * width, width]  # ln_1, attention
        sizes += [width, width, 4 * width * width, 4 * width, 4 * width * width, width]  # ln_2, mlp
    sizes += [width, width, width * embed]  # ln_post, proj
    return sizes


MODELS = {"resnet18": resnet18_sizes, "clip-vit-b32": clip_vit_b32_visual_sizes}
