"""Drop-in names for code written against THUDM's ``trust_remote_code`` models and ``transformers``.

Change only the import line of a reference model card's snippet::

    from visualglm.compat import AutoModel, AutoTokenizer   # was: from transformers import ...
    tokenizer = AutoTokenizer.from_pretrained("THUDM/chatglm-6b", trust_remote_code=True)
    model = AutoModel.from_pretrained("THUDM/chatglm-6b", trust_remote_code=True).half().cuda()
    model = model.eval()
    response, history = model.chat(tokenizer, "你好", history=[])

VisualGLM-6B: ``model.chat(tokenizer, image_path, "描述这张图片。", history=[])``, ``stream_chat`` likewise,
``AutoModel.from_pretrained(...).quantize(8).half().cuda()``. GLM-4V-9B: ``AutoModelForCausalLM``,
``tokenizer.apply_chat_template([...], add_generation_prompt=True, tokenize=True, return_tensors="pt",
return_dict=True)`` and ``model.generate(**inputs, max_length=2500, do_sample=True, top_k=1)``.

``model.generate`` (every family) follows ``transformers``' argument meanings and runs on
``visualglm.generation.engine``; ``model.chat``/``stream_chat`` run on ``ChatSession``. ``model.model``
and ``tokenizer.tokenizer`` are the plain objects the rest of visualglm takes.
"""

from __future__ import annotations

from visualglm.compat.auto import AutoModel, AutoModelForCausalLM, AutoTokenizer
from visualglm.compat.encoding import BatchEncoding
from visualglm.compat.model import CompatModel
from visualglm.compat.tokenizer import CompatTokenizer

__all__ = ["AutoModel", "AutoModelForCausalLM", "AutoTokenizer", "BatchEncoding", "CompatModel", "CompatTokenizer"]
