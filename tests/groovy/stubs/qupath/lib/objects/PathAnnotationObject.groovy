package qupath.lib.objects

import qupath.lib.objects.classes.PathClass
import qupath.lib.roi.interfaces.ROI

/** STAND-IN for QuPath's PathAnnotationObject (not QuPath). */
class PathAnnotationObject extends PathObject {
    PathAnnotationObject(ROI roi, PathClass pathClass) { super(roi, pathClass) }

    @Override
    boolean isAnnotation() { return true }
}
