"""The resampler's comparison in miniature: configs/shapes_lynx.py with LLaVA-1.5's mlp2x_gelu
connector in its place (one token per patch: 64 at 64 px, 144 at 96 px, where the resampler
gives 32 at both), the same stages, steps and adapters:
    python train.py configs/shapes_lynx_mlp.py   (after configs/shapes_lynx.py's prerequisites)
"""
__file__ = __file__.replace("shapes_lynx_mlp.py", "shapes_lynx.py")
exec(open(__file__).read())

out_dir = "out/shapes_lynx_mlp"
eval_blind = False
model = dict(model, projector_type="mlp2x_gelu", resampler_config=None, vision_feature_layer=-1,
             vision_feature_select_strategy="full")
