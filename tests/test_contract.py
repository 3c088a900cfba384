"""CVAT's detector contract: request parsing, image decoding, response items — both ways."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from preannotate.formats import masks
from preannotate.serving.contract import (
    ContractError,
    decode_image,
    parse_detect_request,
    response_to_shapes,
    shapes_to_response,
)
from preannotate.shapes import Shape

from tests.conftest import b64, encode, photo


@pytest.mark.parametrize("body, status, message", [
    (b"", 400, "empty request body"),
    (None, 400, "empty request body"),
    (b"not json", 400, "not JSON"),
    (b"\xff\xfe", 400, "not JSON"),
    ([1, 2], 400, "must be a JSON object"),
    ({"threshold": 0.5}, 400, "no 'image'"),
    ({"image": ""}, 400, "non-empty base64"),
    ({"image": 12}, 400, "non-empty base64"),
    ({"image": "%%%not-base64%%%"}, 400, "not valid base64"),
    ({"image": b64(b"plain text, not an image")}, 400, "not an image file"),
    ({"image": b64(encode(photo())), "threshold": 1.5}, 400, "between 0 and 1"),
    ({"image": b64(encode(photo())), "threshold": -0.1}, 400, "between 0 and 1"),
    ({"image": b64(encode(photo())), "threshold": "0.5"}, 400, "between 0 and 1"),
    ({"image": b64(encode(photo())), "threshold": True}, 400, "between 0 and 1"),
    # what a fuzz run found answered 500 (or dropped) and the texts that were Python's own
    (b"2", 400, "must be a JSON object .*, not 2$"),
    (2, 400, "must be a JSON object .*, not 2$"),  # as Nuclio decodes an application/json body
    (b"1e+308", 400, "not 1e[+]308$"),
    (True, 400, "not true$"),
    (b'"string"', 400, "not a string$"),
    (b"[" * 5000 + b"]" * 5000, 400, "nested too deeply"),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, 400, "nested too deeply"),
    (b"1" * 5000, 400, "too many digits"),
    (b"\x80{}", 400, "not UTF-8 text"),
    (b'{"image": 1', 400, "not JSON from line 1, column 12"),
    (b'{"image": "x", "threshold": NaN}', 400, "between 0 and 1, got NaN"),
    ({"image": b64(encode(photo())), "threshold": "x" * 10000}, 400, "between 0 and 1, got a string$"),
    ({"image": b64(encode(photo(), "PNG")[:60])}, 400, "damaged or truncated PNG file"),
    ({"image": b64(encode(photo())[:300])}, 400, "damaged image file: its header"),
    ({"image": b64(encode(photo())[:1000])}, 400, "damaged or truncated JPEG file"),
])
def test_bad_requests_name_the_problem(body, status, message):
    with pytest.raises(ContractError, match=message) as caught:
        parse_detect_request(body)
    assert caught.value.status == status
    text = str(caught.value)
    assert "0x" not in text and "Error" not in text and "Expecting" not in text and len(text) < 200


def test_bytes_that_are_not_an_image_are_named_so():
    with pytest.raises(ContractError) as caught:
        decode_image(b"plain text, not an image")
    assert str(caught.value) == "'image' is not an image file (JPEG, PNG, or another format Pillow reads)"


@pytest.mark.parametrize("width, height", [(20000, 20000), (9000, 9000)])
def test_an_image_over_the_pixel_limit_is_a_413_read_from_its_header(width, height):
    from tests.test_fuzz import png_of_size  # a few hundred bytes of PNG that say width x height

    with pytest.raises(ContractError, match="over the limit of 67108864 pixels") as caught:
        decode_image(png_of_size(width, height))
    assert caught.value.status == 413 and "Pillow" not in str(caught.value) and "bomb" not in str(caught.value)


def test_an_image_too_narrow_for_a_detector_is_refused():
    with pytest.raises(ContractError, match="1x20000 pixels is too narrow") as caught:
        decode_image(encode(photo(1, 20000), "PNG"))  # the model's resize would make it 0 pixels wide
    assert caught.value.status == 400
    assert decode_image(encode(photo(1, 100), "PNG")).size == (1, 100)


def test_the_pixel_limit_is_a_number_or_width_x_height(monkeypatch):
    monkeypatch.setenv("PREANNOTATE_MAX_IMAGE_PIXELS", "96x63")
    with pytest.raises(ContractError, match="96x64 pixels is over the limit of 6048 pixels"):
        decode_image(encode(photo()))
    monkeypatch.setenv("PREANNOTATE_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="PREANNOTATE_MAX_IMAGE_PIXELS is 'lots'"):  # the operator's mistake: a 500
        decode_image(encode(photo()))


def test_oversized_images_are_refused_before_decoding(monkeypatch):
    monkeypatch.setenv("PREANNOTATE_MAX_IMAGE_PIXELS", str(96 * 64 - 1))
    with pytest.raises(ContractError, match="96x64 pixels is over the limit") as caught:
        parse_detect_request({"image": b64(encode(photo(96, 64)))})
    assert caught.value.status == 413
    monkeypatch.setenv("PREANNOTATE_MAX_IMAGE_PIXELS", str(96 * 64))
    assert parse_detect_request({"image": b64(encode(photo(96, 64)))}).image.size == (96, 64)


def test_request_body_as_bytes_and_threshold():
    raw = json.dumps({"image": b64(encode(photo())), "threshold": 0.25}).encode()
    request = parse_detect_request(raw)
    assert request.threshold == 0.25 and request.image.mode == "RGB" and request.image.size == (96, 64)
    assert parse_detect_request({"image": b64(encode(photo()))}).threshold is None


def test_jpeg_and_png_decode_to_the_same_pixels():
    image = photo(40, 30)
    png = decode_image(encode(image, "PNG"))
    assert np.array_equal(np.asarray(png), np.asarray(image))
    jpeg = np.asarray(decode_image(encode(image, "JPEG", quality=95, subsampling=0))).astype(int)
    assert np.abs(jpeg - np.asarray(image).astype(int)).mean() < 6


def test_sixteen_bit_grayscale_png_is_scaled_to_eight_bits():
    ramp = (np.arange(64, dtype=np.uint16) * 1024).reshape(8, 8)  # 0 .. 64512
    image = decode_image(encode(Image.fromarray(ramp), "PNG"))
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.shape == (8, 8, 3)
    assert pixels[0, 0, 0] == 0 and pixels[-1, -1, 0] == 64512 * 255 // 65535
    assert np.all(pixels[..., 0] == pixels[..., 2])


def test_grayscale_palette_and_rgba_images():
    gray = decode_image(encode(Image.new("L", (5, 4), 77), "PNG"))
    assert np.all(np.asarray(gray) == 77)
    palette = decode_image(encode(photo(20, 10).convert("P"), "PNG"))
    assert palette.mode == "RGB" and palette.size == (20, 10)
    rgba = Image.new("RGBA", (4, 2), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent: shown as white
    pixels = np.asarray(decode_image(encode(rgba, "PNG")))
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[1, 3]) == (10, 20, 30)


def test_exif_rotated_jpeg_is_served_upright():
    image = Image.new("RGB", (60, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left of the upright picture
    # Stored rotated by 90° with EXIF orientation 6 ("rotate 90° clockwise to view"), as phones write it.
    stored = image.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(encode(stored, "JPEG", quality=95, exif=exif.tobytes()))
    assert decoded.size == (60, 20)
    pixels = np.asarray(decoded).astype(int)
    assert pixels[10, 3, 0] > 200 and pixels[10, 3, 2] < 60  # red on the left again
    assert pixels[10, 50, 2] > 200


def test_rectangles_and_masks_in_the_response_and_back():
    bitmap = np.zeros((20, 30), dtype=bool)
    bitmap[5:9, 10:16] = True
    shapes = [
        Shape("car", "rectangle", [1.5, 2.0, 20.25, 18.0], score=0.875, source="auto"),
        Shape("road", "mask", masks.bitmap_to_cvat_rle(bitmap), score=0.5, source="auto"),
        Shape("sign", "polygon", [1, 1, 5, 1, 3, 4], score=0.7, attributes={"kind": "stop"}),
    ]
    items = shapes_to_response(shapes)
    assert items[0] == {"confidence": "0.8750", "label": "car", "type": "rectangle",
                        "points": [1.5, 2.0, 20.25, 18.0], "attributes": []}
    mask = items[1]["mask"]
    assert mask[-4:] == [10, 5, 15, 8]  # inclusive box xtl, ytl, xbr, ybr
    assert mask[:-4] == [1] * (6 * 4)  # the box bitmap, row-major
    polygon = items[1]["points"]  # the outline CVAT uses for "convert masks to polygons"
    xs, ys = polygon[0::2], polygon[1::2]
    assert (min(xs), min(ys), max(xs), max(ys)) == (10, 5, 16, 9)
    assert items[2]["attributes"] == [{"name": "kind", "value": "stop"}]

    back = response_to_shapes(items, frame=7)
    assert [(s.label, s.type, s.frame, s.source) for s in back] == [
        ("car", "rectangle", 7, "auto"), ("road", "mask", 7, "auto"), ("sign", "polygon", 7, "auto")]
    assert back[0].score == 0.875
    assert np.array_equal(masks.cvat_rle_to_bitmap(back[1].points, 30, 20), bitmap)


def test_response_mask_of_another_function_with_255_values():
    items = [{"label": "x", "type": "mask", "mask": [0, 255, 255, 0, 3, 4, 4, 5], "points": []}]
    shape = response_to_shapes(items)[0]
    bitmap = masks.cvat_rle_to_bitmap(shape.points, 8, 8)
    assert bitmap.sum() == 2 and bitmap[4, 4] and bitmap[5, 3]


def test_image_bytes_survive_a_round_trip_through_the_json_body():
    data = io.BytesIO()
    photo(33, 17).save(data, format="PNG")
    assert parse_detect_request({"image": b64(data.getvalue())}).image.size == (33, 17)
