"""Model parts, one module each: sam, mllm, token_rows, chain, losses, cores, builder."""
