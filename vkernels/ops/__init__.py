"""The torch.library ops of each op family (schemas, fake kernels, autograd) and their public functions."""
