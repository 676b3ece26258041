"""What lives on disk: FlowMo checkpoints (`checkpoint`: reading, writing, state-dict layout), the tokenizer by
name, folder or Hugging Face repository and saved for sharing (`pretrained`), the model folder both models share
(`model_folder`: model.safetensors, config.json, the card), its model card (`model_card`), the Hugging Face Hub
(`hub`), image data sets (`data`: folders, ImageNet tars, the bundled photos, loaders), pictures in and out
(`images`), and token shards (`token_shards`: what `flowmo_fast.tokenize` writes). It may import the top of the
library and the FlowMo network (a checkpoint builds a `FlowMo`), never the token generator (`flowmo_fast.maskgit`)
or a command."""
