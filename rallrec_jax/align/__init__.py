"""Item vectors for retrieval: align the text and collaborative views, then mix the blocks.

`contrastive` learns a joint embedding from the two views of each item (RALLRec step 4);
`mix` scales and concatenates the text, cf and joint blocks that retrieval compares (step 5).
"""
