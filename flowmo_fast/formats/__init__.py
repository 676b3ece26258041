"""What lives on disk: FlowMo checkpoints (`checkpoint`: reading, writing, state-dict layout), the published
checkpoints by name (`pretrained`), image data sets (`data`: folders, ImageNet tars, the bundled photos, loaders),
pictures in and out (`images`), and token shards (`token_shards`: what `flowmo_fast.tokenize` writes). It may
import the top of the library and the FlowMo network (a checkpoint builds a `FlowMo`), never the token generator
(`flowmo_fast.maskgit`) or a command."""
