"""What writing into a wide concat buffer costs a narrow conv: MSDNet's 6->6 3x3 at 32x32, batch 256, into
output buffers of 6, 16 and 64 channels (the layer's 6 channels at the end), and 8 calls at batch 32 into a
64-channel buffer; interleaved in one process.

    python python/tools/concat_write_cost.py
"""
import torch
from dynconv_ext.ops import conv2d_into
from dynconv_ext.profile.timing import interleaved_medians
torch.manual_seed(0)
N=256
x=torch.randn(N,6,32,32).contiguous(memory_format=torch.channels_last); w=torch.randn(6,6,3,3); b=torch.randn(6)
fns={}
for cap in (6,16,64):
    o=torch.zeros(N,cap,32,32).contiguous(memory_format=torch.channels_last)
    fns[f"buffer {cap} ch"]=(lambda o=o,cap=cap: conv2d_into(x,w,b,o,cap-6,1,1,activation="relu"))
for n in (32,):
    xs=x[:n].contiguous(memory_format=torch.channels_last); o=torch.zeros(n,64,32,32).contiguous(memory_format=torch.channels_last)
    fns["batch 32 x8, 64 ch"]=(lambda xs=xs,o=o: [conv2d_into(xs,w,b,o,58,1,1,activation="relu") for _ in range(8)])
t=interleaved_medians(fns,reps=11)
for k,v in t.items(): print(f"{k}: {v:.2f} ms")
