"""ControlNet units in A1111 requests, as the sd-webui-controlnet extension's API takes them
(`alwayson_scripts.controlnet.args`, what `webuiapi`'s `controlnet_units=` sends): units -> `Control`s, the
extension's preprocessor names -> ours, its resize modes, and the answers of its `/controlnet/*` routes."""

from __future__ import annotations

import numpy as np
from PIL import Image

from latentforge.server.a1111 import Img2Img, RequestError, Txt2Img, decode_image

# Clients send units as `alwayson_scripts: {"controlnet": {"args": [unit, ...]}}` (webuiapi writes the key
# "ControlNet"; A1111 matches script titles in any case, so do we). A unit is a JSON object; the fields
# honoured are image (base64, or {"image": b64, "mask": b64}; `input_image` of older clients; none in
# img2img: the first init image, as the extension does), module, model, weight, guidance_start/end,
# control_mode, resize_mode, threshold_a/b (canny's low/high thresholds), enabled, hr_option; the rest
# (processor_res, pixel_perfect, low_vram, ...) are ignored: see controlnet_args.

CONTROLNET_API_VERSION = 2  # the extension's `GET /controlnet/version` (external_code.get_api_version)

# The extension's preprocessor ("module") names -> latentforge's (control_images.py), compared in any case.
# Exact: none (the image is the map) and canny (the same Canny with OpenCV's thresholds, 100/200 unless the
# unit's threshold_a/b say). Scribble: ours turns the dark strokes of a drawing on white paper into white
# strokes on black; that is what "invert (from white bg & black line)" (the extension's `invert`) and
# ControlNet 1.0's `scribble` do to a drawing. "scribble_pidinet", "scribble_hed", "scribble_xdog" and 1.0's
# "fake_scribble" find strokes in a photo with edge networks latentforge does not have: they map to the same
# threshold, which equals them on drawings and only approximates them on photos. Seg: the extension's
# "seg_ofade20k", "seg_ofcoco", "seg_ufade20k" (and 1.0's "segmentation") paint each class its palette colour;
# ours paints k-means colour regions (the layout, not the classes). Anything else (depth, openpose,
# lineart, softedge, reference, ip-adapter, ...) is refused with this list.
CONTROLNET_MODULES = {
    "none": "none",
    "canny": "canny",
    "invert": "scribble",
    "invert (from white bg & black line)": "scribble",
    "scribble": "scribble",
    "scribble_pidinet": "scribble",
    "scribble_hed": "scribble",
    "scribble_xdog": "scribble",
    "fake_scribble": "scribble",
    "seg": "seg",
    "seg_ofade20k": "seg",
    "seg_ofcoco": "seg",
    "seg_ufade20k": "seg",
    "segmentation": "seg",
}
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")  # 0, 1, 2
RESIZE_LABELS = ("Just Resize", "Crop and Resize", "Resize and Fill")  # resize_mode 0, 1, 2
RESIZE_OLD = {"scale to fit (inner fit)": "crop", "inner fit": "crop", "envelope (outer fit)": "fill",
              "outer fit": "fill"}  # the extension's older names  # fmt: skip
CANNY_THRESHOLDS = (100.0, 200.0)  # the extension's slider defaults (and ControlNet's gradio_canny2image)


def controlnet_units(req: Txt2Img) -> tuple[str, list] | None:
    """(the alwayson_scripts key as sent, its `args`) of the ControlNet script, or None."""
    for key, value in (req.alwayson_scripts or {}).items():
        if isinstance(key, str) and key.strip().lower() == "controlnet":
            where = f"alwayson_scripts.{key}"
            if isinstance(value, list):  # {"controlnet": [unit, ...]}: the args themselves
                return key, value
            if not isinstance(value, dict) or not isinstance(value.get("args", []), list):
                raise RequestError(where, 'expected {"args": [unit, ...]} (sd-webui-controlnet\'s API)')
            return key, value.get("args", [])
    return None


def echo_without_control_images(echo: dict) -> dict:
    """The request echoed back with the ControlNet units' images and masks left out (as A1111 leaves out
    init_images): the response and the kept job stay small."""
    units = (echo.get("alwayson_scripts") or {}).items()
    for key, value in units:
        if isinstance(key, str) and key.strip().lower() == "controlnet":
            args = value.get("args") if isinstance(value, dict) else value
            for unit in args if isinstance(args, list) else []:
                if isinstance(unit, dict):
                    for f in ("image", "input_image", "mask", "mask_image"):
                        if unit.get(f) is not None:
                            unit[f] = None
    return echo


def _number(unit: dict, name: str, default: float, where: str) -> float:
    v = unit.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(f"{where}.{name}", f"expected a number, got {v!r}")
    return float(v)


def _choice(unit: dict, name: str, default, labels: tuple, by_name: dict, by_number: tuple, where: str):
    """by_number[i] for i or labels[i] (any case), by_name[v] for other names v (lowercase)."""
    v = unit.get(name, default)
    v = default if v is None else v
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(by_number):
        return by_number[v]
    if isinstance(v, str):
        key = v.strip().lower()
        for label, value in zip(labels, by_number, strict=True):
            if key == label.lower():
                return value
        if key in by_name:
            return by_name[key]
    numbered = ", ".join(f"{i} ({n})" for i, n in enumerate(labels))
    more = [n for n in by_name if n not in {x.lower() for x in labels}]
    also = f"; also {', '.join(more)}" if more else ""
    raise RequestError(
        f"{where}.{name}", f"{v!r} is not known; accepted: {numbered}, by number or name{also}"
    )


def control_map(picture: Image.Image, module: str, size: tuple[int, int], resize: str,
                thresholds: tuple[float, float]) -> tuple[Image.Image, str]:  # fmt: skip
    """(the image a Control gets, the preprocess it runs) for a unit's picture at the output size: the
    picture as given when it has the output's size; else resized to it (bicubic, as Control does before a
    preprocessor), first fitted as the extension's resize_mode says when the aspect ratios differ: "crop"
    (Crop and Resize) cuts the middle to the output's aspect ratio; "fill" (Resize and Fill) makes the map
    of the picture scaled to fit inside and pads it with the median colour of the map's border (the
    extension's `high_quality_background`); "just" stretches. Canny with thresholds other than the
    defaults runs here (Control's has the defaults)."""
    from latentforge import control_images

    w, h = size
    picture = picture.convert("RGB")
    pw, ph = picture.size
    k = min(w / pw, h / ph)
    fit = (max(1, round(pw * k)), max(1, round(ph * k)))
    if (pw, ph) != (w, h) and fit != (w, h) and resize == "crop":
        k = max(w / pw, h / ph)
        cw, ch = w / k, h / k
        left, top = (pw - cw) / 2, (ph - ch) / 2
        picture = picture.crop((round(left), round(top), round(left + cw), round(top + ch)))
    elif (pw, ph) != (w, h) and fit != (w, h) and resize == "fill":
        small = picture.resize(fit, Image.BICUBIC)
        if module == "canny":
            small = control_images.canny(small, *thresholds)
        else:
            small = control_images.preprocess(small, module)
        a = np.asarray(small)
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]], axis=0)
        out = np.empty((h, w, 3), np.uint8)
        out[:] = np.median(border, axis=0).astype(np.uint8)
        top, left = (h - fit[1]) // 2, (w - fit[0]) // 2
        out[top : top + fit[1], left : left + fit[0]] = a
        return Image.fromarray(out, "RGB"), "none"
    if picture.size != (w, h):  # here rather than in Control, which warns (a server's log would fill)
        picture = picture.resize((w, h), Image.BICUBIC)
    if module == "canny" and thresholds != CANNY_THRESHOLDS:
        return control_images.canny(picture, *thresholds), "none"
    return picture, module


def controlnet_args(req: Txt2Img, kw: dict, find_model, max_pixels: int) -> tuple[list, dict]:
    """(the enabled units as control_use.Control, their infotext fields "ControlNet k") for a request's
    ControlNet units (`controlnet_units`); kw: its Pipeline arguments (the output size, img2img's init
    image); find_model(name, field) -> the file of a model name. Disabled units (`enabled: false`) are
    skipped unread, as the extension does; k counts every unit sent, as the extension's infotext does.

    Ignored, with why: processor_res and pixel_perfect (the preprocessors here run at the output size,
    which is what pixel perfect asks for), low_vram (memory is the pipeline's: it refuses a job that cannot
    fit), threshold_a/b for any module but canny (ours have no such parameters), save_detected_map and the
    UI's fields. control_mode 1 ("My prompt is more important": the extension's soft injection, a weaker
    ramp on both halves of CFG) has no counterpart here: it runs as Balanced (guess=False), and the
    infotext says Balanced."""
    from latentforge.cli_generate import control_infotext
    from latentforge.control_use import Control

    found = controlnet_units(req)
    if found is None:
        return [], {}
    key, units = found
    controls, fields = [], {}
    for k, unit in enumerate(units):
        where = f"alwayson_scripts.{key}.args[{k}]"
        if not isinstance(unit, dict):
            raise RequestError(where, f"a ControlNet unit is a JSON object of its fields, got {unit!r:.80}")
        enabled = unit.get("enabled", True)
        if not isinstance(enabled, bool):
            raise RequestError(f"{where}.enabled", f"true or false, got {enabled!r}")
        if not enabled:
            continue
        raw = unit.get("module")
        raw = "none" if raw is None else raw
        module = CONTROLNET_MODULES.get(raw.strip().lower()) if isinstance(raw, str) else None
        if module is None:
            raise RequestError(f"{where}.module", f"preprocessor {raw!r} is not known; accepted: "
                                                  f"{', '.join(CONTROLNET_MODULES)}")  # fmt: skip
        model = unit.get("model")
        if not isinstance(model, str) or model.strip() in ("", "None", "none"):
            raise RequestError(f"{where}.model", f"an enabled unit needs a ControlNet model, got {model!r} "
                                                 "(GET /controlnet/model_list)")  # fmt: skip
        path = find_model(model, f"{where}.model")
        image, mask = unit.get("image", unit.get("input_image")), unit.get("mask", unit.get("mask_image"))
        if isinstance(image, dict):  # the extension's newer {"image": b64, "mask": b64}
            image, mask = image.get("image"), image.get("mask", mask)
        if image in (None, ""):
            init = kw.get("init_image")
            if init is None:
                raise RequestError(f"{where}.image", "an enabled unit needs an image (base64)")
            picture = init[0] if isinstance(init, list) else init  # img2img: the init image
        else:
            picture = decode_image(image, f"{where}.image", max_pixels)
        if mask not in (None, ""):
            drawn = decode_image(mask, f"{where}.mask", max_pixels).convert("L").getextrema()[1] > 127
            if drawn:
                raise RequestError(f"{where}.mask", "ControlNet masks (inpaint units) are not supported")
        weight = _number(unit, "weight", 1.0, where)
        start = _number(unit, "guidance_start", 0.0, where)
        end = _number(unit, "guidance_end", 1.0, where)
        for name, v in (("guidance_start", start), ("guidance_end", end)):
            if not 0 <= v <= 1:
                raise RequestError(f"{where}.{name}", f"a fraction of the steps in [0, 1], got {v:g}")
        if start > end:
            raise RequestError(f"{where}.guidance_start", f"{start:g} is after guidance_end {end:g}")
        mode = _choice(unit, "control_mode", 0, CONTROL_MODES, {}, (0, 1, 2), where)
        # 2, "ControlNet is more important": the extension's soft injection plus CFG injection, its residual
        # ramp 0.825^(12-i) on the conditional half only, which is guess mode here exactly. 0 and 1: not
        # guess mode (1's soft injection alone is not available: see the docstring)
        guess = mode == 2 or unit.get("guessmode") is True  # guessmode: the field before control_mode
        resize = _choice(unit, "resize_mode", 1, RESIZE_LABELS, RESIZE_OLD, ("just", "crop", "fill"), where)
        thresholds = CANNY_THRESHOLDS
        if module == "canny":
            given = (_number(unit, f"threshold_{x}", -1.0, where) for x in "ab")  # -1: the default
            low, high = (v if v >= 0 else d for v, d in zip(given, CANNY_THRESHOLDS, strict=True))
            if low > high:
                raise RequestError(f"{where}.threshold_a", f"canny's low threshold {low:g} is over its high "
                                                           f"one (threshold_b) {high:g}")  # fmt: skip
            thresholds = (low, high)
        hr = unit.get("hr_option")
        both = hr is None or (isinstance(hr, str) and hr.strip().lower() == "both")
        if req.enable_hr and not isinstance(req, Img2Img) and not both:
            raise RequestError(f"{where}.hr_option", f"only Both (the ControlNet acts in both passes of the "
                                                     f"hires fix) is supported, got {hr!r}")  # fmt: skip
        image, preprocess = control_map(picture, module, (kw["width"], kw["height"]), resize, thresholds)
        c = Control(path, image, weight=weight, start=start, end=end, guess=guess, preprocess=preprocess)
        try:
            controls.append(c.check(len(controls)))
        except ValueError as e:
            raise RequestError(where, str(e)) from None
        shown = Control(path, None, weight=weight, start=start, end=end, guess=guess, preprocess=module)
        text = next(iter(control_infotext([shown]).values()))
        if module == "canny" and thresholds != CANNY_THRESHOLDS:
            text += f", Threshold A: {thresholds[0]:g}, Threshold B: {thresholds[1]:g}"
        fields[f"ControlNet {k}"] = text
    return controls, fields


# -- responses ------------------------------------------------------------------------------------------
