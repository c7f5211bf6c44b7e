"""What a user would write in plain PyTorch for a masked conv: unfold, gather active columns, matmul, scatter."""
import torch.nn.functional as F

from ..reference import expand_block_mask


def torch_gather_scatter_conv2d(input, weight, bias, mask, stride=1, padding=0, dilation=1, block_size=1):
    """Masked conv (groups=1) by im2col + index_select + mm + index_put; the baseline of the benchmarks."""
    n, _, h, w = input.shape
    c_out, _, kh, kw = weight.shape
    cols = F.unfold(input, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [N, K, L]
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    pixel_mask = expand_block_mask(mask, block_size, (ho, wo)).flatten(1)  # [N, L]
    batch_idx, pix_idx = pixel_mask.nonzero(as_tuple=True)
    rows = cols[batch_idx, :, pix_idx]  # [M, K]
    out_rows = rows @ weight.reshape(c_out, -1).t()
    if bias is not None:
        out_rows = out_rows + bias
    out = input.new_zeros(n, ho * wo, c_out)
    out[batch_idx, pix_idx] = out_rows
    return out.view(n, ho, wo, c_out).permute(0, 3, 1, 2)
