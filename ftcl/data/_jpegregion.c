/* ftcl.data._jpegregion: decode one rectangle of a JPEG with libjpeg(-turbo).
 *
 * decode(data, reduction, top, bottom, left, right) -> (pixels, x0, width) or None
 *
 * Decodes rows [top, bottom) and at least columns [left, right) of `data` decoded at
 * 1/`reduction` of its size (libjpeg's DCT scaling; coordinates are in the scaled image) to packed
 * RGB: `pixels` is a bytearray of (bottom - top) x width x 3 bytes whose first column is column
 * `x0` of the scaled image (libjpeg widens the columns to whole iMCUs: x0 <= left,
 * x0 + width >= right).
 *
 * What is saved against a whole decode: rows above `top` are entropy-decoded only
 * (jpeg_skip_scanlines: no IDCT, upsampling or colour conversion), rows below `bottom` are not
 * read at all (the decode stops there), and columns outside the iMCU-aligned range get no IDCT,
 * upsampling or colour conversion (jpeg_crop_scanline). A progressive (multi-scan) file is
 * entropy-decoded whole by jpeg_start_decompress, so there only IDCT and colour conversion are saved.
 *
 * Pixels: the same settings as Pillow's decoder and TurboJPEG's (accurate integer DCT, fancy
 * upsampling), so a pixel equals the whole decode's pixel EXCEPT in the first and last column of
 * the returned range, where fancy upsampling has no neighbour to the side: callers ask for one
 * column more on each side than they use (the Python side does; the test checks the identity).
 *
 * None when the file is not a YCbCr or greyscale JPEG, or when libjpeg reports any error or
 * warning (strict, like TurboJPEG's strict mode) in what it reads: the caller then decodes the
 * whole file another way. Damage below `bottom` (e.g. a file cut short there) goes unnoticed, as
 * those bytes are never read: the caller only passes files that end with the EOI marker.
 * The GIL is released while libjpeg works.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <jpeglib.h>

/* 2.1: jpeg_skip_scanlines and jpeg_crop_scanline with the fixes of 2.0.x (4:4:0 upsampling rounding,
   progressive block smoothing, skip bugs) that make a region's pixels the whole decode's */
#if !defined(LIBJPEG_TURBO_VERSION_NUMBER) || LIBJPEG_TURBO_VERSION_NUMBER < 2001000
#error "needs libjpeg-turbo >= 2.1 (jpeg_skip_scanlines, jpeg_crop_scanline); without it ftcl decodes whole files"
#endif

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
} strict_error_mgr;

static void fail(j_common_ptr cinfo) {
    longjmp(((strict_error_mgr *)cinfo->err)->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) /* a warning (corrupt data, ...): refuse, as a strict decoder does */
        fail(cinfo);
}

static PyObject *decode(PyObject *self, PyObject *args) {
    Py_buffer data;
    int reduction, top, bottom, left, right;
    if (!PyArg_ParseTuple(args, "y*iiiii", &data, &reduction, &top, &bottom, &left, &right))
        return NULL;
    if (reduction != 1 && reduction != 2 && reduction != 4 && reduction != 8) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "reduction must be 1, 2, 4 or 8, got %d", reduction);
    }
    if (top < 0 || left < 0 || bottom <= top || right <= left) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "region rows [%d, %d) x columns [%d, %d) is empty or negative", top,
                            bottom, left, right);
    }
    struct jpeg_decompress_struct cinfo;
    strict_error_mgr err;
    PyObject *volatile pixels = NULL;
    PyThreadState *volatile released = NULL; /* non-NULL while the GIL is released */
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = fail;
    err.pub.emit_message = on_message;
    if (setjmp(err.jump)) { /* any libjpeg error or warning, from jpeg_create_decompress on */
        if (released)
            PyEval_RestoreThread(released);
        jpeg_destroy_decompress(&cinfo); /* safe: jpeg_create_decompress clears cinfo.mem first */
        PyBuffer_Release(&data);
        Py_XDECREF(pixels);
        Py_RETURN_NONE;
    }
    /* header, and for progressive (multi-scan) files the whole file's entropy decoding, in
       jpeg_start_decompress: without the GIL */
    released = PyEval_SaveThread();
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space != JCS_YCbCr && cinfo.jpeg_color_space != JCS_GRAYSCALE)
        fail((j_common_ptr)&cinfo);
    cinfo.out_color_space = JCS_RGB;
    cinfo.dct_method = JDCT_ISLOW;
    cinfo.do_fancy_upsampling = TRUE;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)reduction;
    jpeg_calc_output_dimensions(&cinfo);
    JDIMENSION out_width = cinfo.output_width, out_height = cinfo.output_height;
    if ((JDIMENSION)bottom > out_height || (JDIMENSION)right > out_width) {
        jpeg_destroy_decompress(&cinfo);
        PyEval_RestoreThread(released);
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError,
                            "region rows [%d, %d) x columns [%d, %d) is not inside the %u x %u (width x height) image",
                            top, bottom, left, right, out_width, out_height);
    }
    jpeg_start_decompress(&cinfo);
    JDIMENSION x0 = (JDIMENSION)left, width = (JDIMENSION)(right - left);
    if (width < out_width)
        jpeg_crop_scanline(&cinfo, &x0, &width);
    else
        x0 = 0, width = out_width;
    size_t stride = (size_t)width * 3, rows = (size_t)(bottom - top);
    PyEval_RestoreThread(released);
    released = NULL;
    if (rows > (size_t)PY_SSIZE_T_MAX / stride)
        pixels = PyErr_NoMemory();
    else
        pixels = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(stride * rows));
    if (!pixels) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        return NULL;
    }
    unsigned char *out = (unsigned char *)PyByteArray_AS_STRING(pixels);
    released = PyEval_SaveThread();
    if (top > 0)
        jpeg_skip_scanlines(&cinfo, (JDIMENSION)top);
    while (cinfo.output_scanline < (JDIMENSION)bottom) {
        JSAMPROW row = out + stride * (cinfo.output_scanline - (JDIMENSION)top);
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    jpeg_destroy_decompress(&cinfo); /* without jpeg_finish_decompress: the rows below are not needed */
    PyEval_RestoreThread(released);
    released = NULL;
    PyBuffer_Release(&data);
    return Py_BuildValue("Nii", pixels, (int)x0, (int)width);
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS,
     "decode(data, reduction, top, bottom, left, right) -> (bytearray, x0, width) or None: rows [top, bottom) "
     "and (at least) columns [left, right) of a YCbCr or greyscale JPEG decoded at 1/reduction, packed RGB."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpegregion",
                                    "Decode one rectangle of a JPEG (libjpeg DCT scaling, skip and crop).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__jpegregion(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "LIBJPEG_VERSION", JPEG_LIB_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (m && PyModule_AddIntConstant(m, "LIBJPEG_TURBO_VERSION", LIBJPEG_TURBO_VERSION_NUMBER) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
