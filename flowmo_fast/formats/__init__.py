"""What lives on disk: FlowMo checkpoints (`checkpoint`: reading, writing, state-dict layout), the tokenizer by
name, folder or Hugging Face repository and saved for sharing (`pretrained`), the model folder both models share
(`model_folder`: model.safetensors, config.json, the card), its model card (`model_card`), the Hugging Face Hub
(`hub`), image data sets (`data`: folders, ImageNet tars, WebDataset shards, the bundled photos, loaders;
`image_shards` indexes the shards, `tar_members` reads a tar's headers, `data_errors` is the error they share),
pictures in and out (`images`), and token shards (`token_shards`: what `flowmo_fast.tokenize` writes). It may import
the top of the library and the FlowMo network (a checkpoint builds a `FlowMo`), never the token generator
(`flowmo_fast.maskgit`) or a command."""
